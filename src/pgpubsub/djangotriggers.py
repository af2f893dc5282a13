"""The triggers of ``model = ...`` trigger channels, as django-pgtrigger triggers.

A trigger listener registers one pgtrigger trigger per row event on the
channel's model; ``makemigrations`` writes them into the app's migrations and
``migrate`` installs them, as django-pgtrigger does for any trigger. Changing
``lock_notifications`` changes the trigger body, so it needs a migration too.
AFTER INSERT and AFTER DELETE triggers are statement-level with a transition
table, as without Django (:mod:`pgpubsub.triggers`).
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

from .channel import ChannelSpec
from .triggers import TRANSITION, model_of, trigger_name

__all__ = ["register_triggers"]

_ROW_BODY = """
PERFORM pgpubsub.notify_row(
    {channel}, {durable}, TG_OP, TG_WHEN, pg_catalog.concat(TG_TABLE_SCHEMA, '.', TG_TABLE_NAME),
    CASE WHEN TG_OP <> 'INSERT' THEN pg_catalog.to_jsonb(OLD) END,
    CASE WHEN TG_OP <> 'DELETE' THEN pg_catalog.to_jsonb(NEW) END
);
IF TG_OP = 'DELETE' THEN
    RETURN OLD;
END IF;
RETURN NEW;
"""

# AFTER INSERT / AFTER DELETE: once per statement, rows from the transition table.
_STATEMENT_BODY = """
PERFORM pgpubsub.send_events({channel}, {durable}, ARRAY(
    SELECT pgpubsub.event(
        TG_OP, TG_WHEN, pg_catalog.concat(TG_TABLE_SCHEMA, '.', TG_TABLE_NAME), {old}, {new}
    ) FROM {rows} r
));
RETURN NULL;
"""


def _trigger(spec: ChannelSpec, event: str) -> Any:
    import pgtrigger

    when, op = event.split()
    literals = {
        "channel": sql.Literal(spec.name).as_string(),
        "durable": "true" if spec.lock else "false",
    }
    options: dict[str, Any] = {
        "name": trigger_name(spec, event),
        "when": pgtrigger.Before if when == "BEFORE" else pgtrigger.After,
        "operation": getattr(pgtrigger, op.capitalize()),
        "func": _ROW_BODY.format(**literals),
    }
    if event in TRANSITION:
        side, rows = TRANSITION[event]
        row = {"old": "NULL", "new": "NULL", side.lower(): "pg_catalog.to_jsonb(r)"}
        options.update(
            level=pgtrigger.Statement,
            referencing=pgtrigger.Referencing(**{side.lower(): rows}),  # type: ignore[no-untyped-call]
            func=_STATEMENT_BODY.format(**literals, **row, rows=rows),
        )
    return pgtrigger.Trigger(**options)


_registered: set[tuple[str, str, str]] = set()


def register_triggers(spec: ChannelSpec, events: frozenset[str]) -> None:
    """Register (once) a pgtrigger trigger for each of ``events`` on the channel's model."""
    import pgtrigger

    model = model_of(spec)
    for event in sorted(events):
        key = (spec.name, model._meta.label, event)
        if key not in _registered:
            pgtrigger.register(_trigger(spec, event))(model)
            _registered.add(key)
