"""The triggers of ``model = ...`` trigger channels, as django-pgtrigger triggers.

A trigger listener registers one pgtrigger trigger per row event on the
channel's model; ``makemigrations`` writes them into the app's migrations and
``migrate`` installs them, as django-pgtrigger does for any trigger. Changing
``lock_notifications`` changes the trigger body, so it needs a migration too.
"""

from __future__ import annotations

from psycopg import sql

from .channel import ChannelSpec
from .triggers import channel_hash, model_of

__all__ = ["register_triggers"]

_BODY = """
PERFORM pgpubsub.notify_row(
    {channel}, {durable}, TG_OP, TG_WHEN, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
    CASE WHEN TG_OP <> 'INSERT' THEN pg_catalog.to_jsonb(OLD) END,
    CASE WHEN TG_OP <> 'DELETE' THEN pg_catalog.to_jsonb(NEW) END
);
IF TG_OP = 'DELETE' THEN
    RETURN OLD;
END IF;
RETURN NEW;
"""

_registered: set[tuple[str, str, str]] = set()


def register_triggers(spec: ChannelSpec, events: frozenset[str]) -> None:
    """Register (once) a pgtrigger trigger for each of ``events`` on the channel's model."""
    import pgtrigger

    model = model_of(spec)
    body = _BODY.format(
        channel=sql.Literal(spec.name).as_string(), durable="true" if spec.lock else "false"
    )
    for event in sorted(events):
        key = (spec.name, model._meta.label, event)
        if key in _registered:
            continue
        when, op = event.split()
        pgtrigger.register(
            pgtrigger.Trigger(
                name=f"pgpubsub_{channel_hash(spec)}_{when}_{op}".lower(),
                when=pgtrigger.Before if when == "BEFORE" else pgtrigger.After,
                operation=getattr(pgtrigger, op.capitalize()),
                func=body,
            )
        )(model)
        _registered.add(key)
