"""Trigger channels: row events of a table delivered to listeners.

::

    @dataclass
    class OrderEvents(TriggerChannel, table="shop.orders"):
        pass

    @pgpubsub.post_insert_listener(OrderEvents)
    def on_new_order(old: None, new: dict) -> None: ...

Each decorated listener asks for some row events (``post_insert`` = AFTER
INSERT, ``pre_save`` = BEFORE INSERT or UPDATE, ...); each event gets its own
row-level trigger on the table, and a listener is only called for the events it
asked for. Install the triggers with :func:`install_triggers` (or ``pgpubsub
migrate <modules>``); under Django the triggers of ``model = ...`` channels are
django-pgtrigger triggers installed by ``manage.py migrate``.

Each event has a pair of triggers (``sql/schema.sql``): the first turns the
rows into JSON as the role that wrote them, the second publishes them as the
schema's owner through ``pgpubsub.send_events``, for the (table, channel)
pairs registered here only. The event JSON (operation, when, table, old and
new rows, context) goes in the NOTIFY; when it
is over PostgreSQL's 8000-byte limit it is stored and only its id is sent, so
a wide row never makes the user's write fail. AFTER INSERT and AFTER DELETE
triggers are statement-level (the rows come from a transition table, in one
set-based call); the others fire per row. Durable trigger channels
(``lock_notifications``) always store the event (exactly-once processing, as
for any durable channel). Triggers never cancel or change the operation: a
BEFORE trigger returns the row as it came. Every identifier is quoted, and
notifications go through ``pg_catalog.pg_notify``. Nothing is sent for a
rolled-back write.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from . import driver
from ._trigger_events import OPERATIONS, TRANSITION, WHENS, channel_hash, model_of, trigger_name
from .channel import ChannelSpec, TriggerChannel, resolve_channel
from .errors import ConfigurationError
from .listen import Registry, registry

__all__ = [  # and Notify, the django-pgtrigger trigger class (needs Django)
    "install_triggers",
    "post_delete_listener",
    "post_insert_listener",
    "post_save_listener",
    "post_update_listener",
    "pre_delete_listener",
    "pre_insert_listener",
    "pre_save_listener",
    "pre_update_listener",
    "remove_triggers",
    "set_notification_context",
    "trigger_listener",
]

F = TypeVar("F", bound=Callable[..., Any])

SPILL_PREFIX = '{"spill": '
SPILL_TTL = 600.0  # seconds a spilled event is kept for plain listeners to read
# Rows another transaction holds (a purge) are left for the next clean-up.
PURGE_SPILL_SQL = (
    "DELETE FROM pgpubsub.message WHERE id IN (SELECT id FROM pgpubsub.message "
    "WHERE status = 'spill' AND channel = ANY(%s) "
    "AND created_at < pg_catalog.now() - pg_catalog.make_interval(secs => %s) "
    "FOR UPDATE SKIP LOCKED)"
)
CONTEXT_SETTING = "pgpubsub.notification_context"
_SPILL_SQL = (
    "SELECT payload FROM pgpubsub.message WHERE id = %s AND channel = %s AND status = 'spill'"
)

log = logging.getLogger("pgpubsub.triggers")


def __getattr__(name: str) -> Any:
    # ``Notify`` is a django-pgtrigger trigger: imported on first use, so this
    # module works without Django.
    if name == "Notify":
        from ._djangotriggers import Notify

        return Notify
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _events(when: str, operations: Iterable[str]) -> frozenset[str]:
    when = when.upper()
    ops = [op.strip().upper() for op in operations]
    if when not in WHENS or not ops or any(op not in OPERATIONS for op in ops):
        raise ConfigurationError(
            f"trigger events are BEFORE/AFTER and INSERT/UPDATE/DELETE, not {when} {ops}"
        )
    return frozenset(f"{when} {op}" for op in ops)


def _trigger_spec(channel: type[Any] | str) -> ChannelSpec:
    spec = resolve_channel(channel)
    if not issubclass(spec.cls, TriggerChannel):
        raise ConfigurationError(f"{spec.path} is not a TriggerChannel")
    if "$" in spec.name:
        raise ConfigurationError(f"trigger channel names may not contain '$': {spec.name!r}")
    if model_of(spec) is None and "table" not in spec.cls._pgpubsub_options:
        raise ConfigurationError(f"{spec.path} needs table=... (or model = ... under Django)")
    return spec


def trigger_listener(
    channel: type[Any] | str,
    trigger: Any = None,
    *,
    when: str = "AFTER",
    operations: Iterable[str] = OPERATIONS,
    registry: Registry = registry,
) -> Callable[[F], F]:
    """A listener of the row events ``when`` x ``operations`` of a trigger channel.

    ``trigger`` may be a django-pgtrigger trigger (django-pgpubsub's form): its
    ``when`` and ``operation`` are used; a :class:`Notify` trigger is installed
    as it is, condition included, in place of the channel's default trigger.
    """
    if trigger is not None:
        when = str(trigger.when)
        operations = str(trigger.operation).split(" OR ")
    events = _events(when, operations)

    def decorate(fn: F) -> F:
        spec = _trigger_spec(channel)
        registry.add(spec.cls, fn, events=events)
        if model_of(spec) is not None:
            from ._djangotriggers import register_triggers

            register_triggers(spec, events, trigger)
        return fn

    return decorate


def _shortcut(when: str, *operations: str) -> Callable[..., Callable[[F], F]]:
    def decorator(channel: type[Any] | str, *, registry: Registry = registry) -> Callable[[F], F]:
        return trigger_listener(channel, when=when, operations=operations, registry=registry)

    decorator.__doc__ = f"A listener of {' and '.join(operations)} rows ({when} the write)."

    return decorator


pre_save_listener = _shortcut("BEFORE", "INSERT", "UPDATE")
post_save_listener = _shortcut("AFTER", "INSERT", "UPDATE")
pre_insert_listener = _shortcut("BEFORE", "INSERT")
post_insert_listener = _shortcut("AFTER", "INSERT")
pre_update_listener = _shortcut("BEFORE", "UPDATE")
post_update_listener = _shortcut("AFTER", "UPDATE")
pre_delete_listener = _shortcut("BEFORE", "DELETE")
post_delete_listener = _shortcut("AFTER", "DELETE")


# -- installing (without Django) -----------------------------------------------------


def table_of(spec: ChannelSpec) -> tuple[str, str]:
    table = spec.cls._pgpubsub_options.get("table")
    if isinstance(table, tuple) and len(table) == 2:
        return str(table[0]), str(table[1])
    if isinstance(table, str) and "." in table:
        schema, _, name = table.partition(".")
        return schema, name
    raise ConfigurationError(f"{spec.path}: table must be 'schema.name' or (schema, name)")


def _level(event: str) -> sql.Composable:
    if event not in TRANSITION:
        return sql.SQL("FOR EACH ROW")
    side, rows = TRANSITION[event]
    return sql.SQL("REFERENCING {} TABLE AS {} FOR EACH STATEMENT").format(
        sql.SQL(side), sql.Identifier(rows)
    )


_EXISTING_SQL = (
    "SELECT c.oid, t.tgname FROM pg_catalog.pg_class c "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "LEFT JOIN pg_catalog.pg_trigger t ON t.tgrelid = c.oid AND NOT t.tgisinternal "
    "AND t.tgname LIKE %s "
    "WHERE n.nspname = %s AND c.relname = %s"
)
_REGISTER_SQL = (
    "INSERT INTO pgpubsub.trigger_channel (relid, channel, durable) VALUES (%s, %s, %s) "
    "ON CONFLICT (relid, channel) DO UPDATE SET durable = EXCLUDED.durable"
)
_UNREGISTER_SQL = "DELETE FROM pgpubsub.trigger_channel WHERE relid = %s AND channel = %s"
_CREATE_SQL = (
    "CREATE TRIGGER {name} {when} {op} ON {table} {level} EXECUTE FUNCTION {function}({args})"
)


def _sync_triggers(conn: Any, spec: ChannelSpec, events: frozenset[str]) -> None:
    """Make the table's triggers for ``spec`` exactly those of ``events``.

    Each event gets a pair (``sql/schema.sql``): ``<name>`` captures the rows
    as the writer, ``<name>_send`` publishes them as the schema's owner, for
    the (table, channel) pair registered here only.
    """
    schema, table = table_of(spec)
    target = sql.Identifier(schema, table)
    pattern = f"pgpubsub\\_%\\_{channel_hash(spec)}%"
    with conn.cursor() as cur:
        cur.execute(_EXISTING_SQL, (pattern, schema, table))
        rows = cur.fetchall()
        if not rows:
            raise ConfigurationError(f"{spec.path}: no table {schema}.{table}")
        relid = rows[0][0]
        existing = {r[1] for r in rows if r[1] is not None}
        wanted = {trigger_name(spec, e): e for e in events}
        for name in existing | set(wanted) | {f"{n}_send" for n in wanted}:
            cur.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), target)
            )
        if wanted:
            cur.execute(_REGISTER_SQL, (relid, spec.name, spec.lock))
        else:
            cur.execute(_UNREGISTER_SQL, (relid, spec.name))
        channel = sql.Literal(spec.name)
        mode = sql.Literal("durable" if spec.lock else "plain")
        for name, event in sorted(wanted.items()):
            when, op = event.split()
            parts = {
                "when": sql.SQL(when),  # from the fixed WHENS / OPERATIONS lists
                "op": sql.SQL(op),
                "table": target,
            }
            capture = "notify_statement" if event in TRANSITION else "notify_trigger"
            cur.execute(
                sql.SQL(_CREATE_SQL).format(
                    name=sql.Identifier(name),
                    level=_level(event),
                    function=sql.Identifier("pgpubsub", capture),
                    args=sql.SQL(", ").join([channel, mode]),
                    **parts,
                )
            )
            level = "FOR EACH STATEMENT" if event in TRANSITION else "FOR EACH ROW"
            cur.execute(
                sql.SQL(_CREATE_SQL).format(
                    name=sql.Identifier(f"{name}_send"),
                    level=sql.SQL(level),
                    function=sql.Identifier("pgpubsub", "send_captured"),
                    args=channel,
                    **parts,
                )
            )


def install_triggers(
    conn: Any, channels: Iterable[type[Any] | str] | None = None, registry: Registry = registry
) -> int:
    """Create the triggers the registered listeners need, and drop the ones they no longer need.

    Idempotent; runs in ``conn``'s transaction (commit is the caller's).
    Channels bound to a Django model are left to django-pgtrigger. Needs the
    pgpubsub schema (:func:`pgpubsub.durable.migrate`). Returns how many
    triggers are installed.
    """
    specs = [resolve_channel(c) for c in channels] if channels else registry.channels()
    total = 0
    for spec in specs:
        if issubclass(spec.cls, TriggerChannel) and model_of(spec) is None:
            events = registry.events(spec)
            try:
                _sync_triggers(conn, spec, events)
            except psycopg.Error as exc:
                raise driver.translate(exc, f"installing the triggers of {spec.path}") from exc
            total += len(events)
    return total


def remove_triggers(conn: Any, channels: Iterable[type[Any] | str]) -> None:
    """Drop every trigger of these channels (idempotent)."""
    for channel in channels:
        _sync_triggers(conn, _trigger_spec(channel), frozenset())


# -- at run time -----------------------------------------------------------------------


def set_notification_context(context: dict[str, Any], conn: Any = None, local: bool = True) -> None:
    """Attach ``context`` (a JSON object) to the row events of this transaction.

    Trigger events then carry it as ``context``, and stored messages keep it in
    their ``context`` column. ``local=True`` (default) scopes it to the current
    transaction, like ``SET LOCAL`` - so call it inside the transaction (in
    Django, inside ``transaction.atomic()``: in autocommit it ends with its own
    statement); ``local=False`` keeps it for the session.
    ``conn`` defaults as for :func:`pgpubsub.notify`.
    """
    from .notify import default_connection

    conn = default_connection() if conn is None else conn
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_catalog.set_config(%s, %s, %s)",
            (CONTEXT_SETTING, json.dumps(context), local),
        )


def read_spill(conninfo: str, payload: str, channel: str) -> str | None:
    """The stored event a ``{"spill": id, "sha256": digest}`` notification points to.

    Only a spill row of ``channel`` whose text has that digest is returned:
    anyone may send such a reference with ``pg_notify``, and a forged or stale
    one is logged and gives None (the listener is not called).
    """
    if not payload.startswith(SPILL_PREFIX):
        return payload
    try:
        ref = json.loads(payload)
        mid, digest = int(ref["spill"]), str(ref["sha256"])
    except (ValueError, KeyError, TypeError):
        log.warning("channel %r: malformed spill reference %.200r skipped", channel, payload)
        return None
    conn = driver.thread_connection(conninfo)
    row = conn.execute(_SPILL_SQL, (mid, channel)).fetchone()
    text = None if row is None else str(row[0])
    if text is None or not hmac.compare_digest(hashlib.sha256(text.encode()).hexdigest(), digest):
        log.warning(
            "channel %r: spill reference %s matches no spilled event of this channel "
            "(forged, or purged after %.0f s); skipped",
            channel,
            mid,
            SPILL_TTL,
            extra={"channel": channel, "message_id": mid},
        )
        return None
    return text
