"""The ``Notification`` model: Django's view of ``pgpubsub.message``.

The table comes from ``sql/schema.sql`` (the same source ``pgpubsub migrate``
applies); the migration runs that file, so the model is unmanaged. It has every
column but ``segment``, where the row is stored (the table's default picks it:
see the durable guide's "Storage"), so that a row the ORM creates goes where
the database says.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

STATUS_CHOICES = [
    ("pending", "pending"),
    ("dead", "dead"),
    ("done", "done"),
    ("spill", "spill (wide trigger row)"),
]


class Notification(models.Model):
    id = models.BigAutoField(primary_key=True)
    channel = models.TextField()
    payload = models.TextField()
    status = models.TextField(choices=STATUS_CHOICES, default="pending")
    attempts = models.IntegerField(default=0)
    # The table's defaults, at the model level too: Notification.objects.create()
    # sends every column, so a missing default would be an explicit NULL.
    run_at = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(null=True)
    context = models.JSONField(null=True)
    created_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True)
    trace = models.JSONField(null=True)  # the publisher's OpenTelemetry context
    priority = models.IntegerField(default=0)
    dedupe_key = models.TextField(null=True)
    ordering_key = models.TextField(null=True)
    # An attempt was claimed and its outcome never recorded (its worker stopped).
    unfinished = models.BooleanField(default=False)
    claimed_alone = models.BooleanField(default=False)  # its last attempt ran alone
    result = models.JSONField(null=True)  # a results channel's listener's return value
    batch_id = models.BigIntegerField(null=True)  # the batch (pgpubsub.batch) it belongs to
    limit_key = models.TextField(null=True)  # the key of key_rate_limit and key_concurrency

    class Meta:
        managed = False
        db_table = 'pgpubsub"."message'
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.channel} #{self.id} ({self.status})"
