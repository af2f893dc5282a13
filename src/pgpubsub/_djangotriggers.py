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

import pgtrigger
from psycopg import sql

from ._trigger_events import TRANSITION, model_of, trigger_name
from .channel import ChannelSpec, resolve_channel
from .errors import ConfigurationError

__all__ = ["Notify", "register_triggers"]

# pgtrigger's functions do not pin search_path: every name here, operators
# included, is qualified, so a writer's search_path cannot redirect them.
_ROW_BODY = """
PERFORM pgpubsub.notify_row(
    {channel}, {durable}, TG_OP, TG_WHEN, pg_catalog.concat(TG_TABLE_SCHEMA, '.', TG_TABLE_NAME),
    CASE WHEN TG_OP OPERATOR(pg_catalog.<>) 'INSERT' THEN pg_catalog.to_jsonb(OLD) END,
    CASE WHEN TG_OP OPERATOR(pg_catalog.<>) 'DELETE' THEN pg_catalog.to_jsonb(NEW) END
);
IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
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


def _literals(spec: ChannelSpec) -> dict[str, str]:
    return {
        "channel": sql.Literal(spec.name).as_string(),
        "durable": "true" if spec.lock else "false",
    }


def _trigger(spec: ChannelSpec, event: str) -> Any:
    when, op = event.split()
    literals = _literals(spec)
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


class Notify(pgtrigger.Trigger):
    """django-pgpubsub's trigger class: a django-pgtrigger trigger sending a channel's row events.

    Give one to :func:`pgpubsub.trigger_listener` to choose the trigger
    yourself, for example to notify only when a condition holds::

        @pgpubsub.trigger_listener(AuthorTriggerChannel, Notify(
            name="author_renamed", operation=pgtrigger.Update, when=pgtrigger.After,
            condition=pgtrigger.AnyChange("name"),
        ))
        def on_rename(old: Author, new: Author) -> None: ...

    or put it in a model's ``Meta.triggers`` with ``channel=`` (the channel
    class or its dotted path). It is a row-level trigger; it replaces the
    channel's default trigger for its events, so every listener of the channel
    sees the events it lets through. ``makemigrations`` writes it and
    ``migrate`` installs it, as for any pgtrigger trigger.
    """

    def __init__(self, *, channel: type[Any] | str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.channel = channel

    def bind(self, spec: ChannelSpec) -> None:
        """Send the events of ``spec`` (done by :func:`pgpubsub.trigger_listener`)."""
        if self.channel is not None and resolve_channel(self.channel) != spec:
            raise ConfigurationError(f"trigger {self.name!r} already sends {self.channel}")
        self.channel = spec.cls

    def get_func(self, model: Any) -> str:
        if self.channel is None:
            raise ConfigurationError(
                f"Notify trigger {self.name!r} has no channel: pass it to"
                " pgpubsub.trigger_listener(channel, trigger) or give channel="
            )
        return _ROW_BODY.format(**_literals(resolve_channel(self.channel)))


_registered: dict[tuple[str, str, str], str] = {}  # (channel, model, event) -> trigger name


def register_triggers(spec: ChannelSpec, events: frozenset[str], trigger: Any = None) -> None:
    """Register (once) the trigger of each of ``events`` on the channel's model.

    ``trigger``, a :class:`Notify`, is registered for all of them instead of
    the default triggers; a channel has one trigger per event.
    """
    model = model_of(spec)
    if isinstance(trigger, Notify):
        trigger.bind(spec)
        keys = {(spec.name, model._meta.label, event) for event in events}
        taken = {_registered[k] for k in keys if k in _registered} - {trigger.name}
        if taken:
            raise ConfigurationError(
                f"{spec.path} already has trigger(s) {sorted(taken)} for {sorted(events)};"
                " give every listener of these events the same Notify trigger"
            )
        if not keys <= _registered.keys():
            pgtrigger.register(trigger)(model)
            _registered.update({key: str(trigger.name) for key in keys})
        return
    for event in sorted(events):
        key = (spec.name, model._meta.label, event)
        if key not in _registered:
            default = _trigger(spec, event)
            pgtrigger.register(default)(model)
            _registered[key] = default.name
