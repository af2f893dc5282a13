"""Admin for stored notifications: filter by status and channel, read errors, replay.

With ``PGPUBSUB_DASHBOARD_URL`` set (where the project serves ``pgpubsub
dashboard`` or mounts :func:`pgpubsub.dashboard.create_app`), the list links
to the live dashboard.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.db import connection, transaction

from . import messages as stored
from .models import Notification


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = ("id", "channel", "status", "attempts", "run_at", "created_at", "error")
    list_filter = ("status", "channel")
    search_fields = ("channel", "payload", "last_error")
    readonly_fields = [f.name for f in Notification._meta.fields]
    actions = ["replay"]
    change_list_template = "admin/pgpubsub/notification/change_list.html"

    def changelist_view(self, request: Any, extra_context: Any = None) -> Any:
        url = getattr(settings, "PGPUBSUB_DASHBOARD_URL", None)
        return super().changelist_view(
            request, {**(extra_context or {}), "pgpubsub_dashboard_url": url}
        )

    @admin.display(description="last error")
    def error(self, obj: Notification) -> str:
        lines = (obj.last_error or "").strip().splitlines()
        return lines[-1] if lines else ""

    @admin.action(description="Replay: run again now, attempts reset")
    def replay(self, request: Any, queryset: Any) -> None:
        ids = list(queryset.values_list("id", flat=True))

        def replay() -> stored.ReplayResult:
            with transaction.atomic():
                return stored.replay(connection, ids=ids, status=("dead", "pending"))

        result = stored.in_own_transaction(replay)
        n = len(result.replayed)
        self.message_user(request, f"{n} notification(s) will run again", messages.SUCCESS)
        for skipped in result.skipped:
            text = f"{skipped.id} not replayed: {skipped.reason}"
            self.message_user(request, text, messages.WARNING)

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False
