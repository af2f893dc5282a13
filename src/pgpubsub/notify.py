"""Publishing on typed channels: ``pgpubsub.notify(Channel_or_path, **fields)``.

The message joins the transaction of the connection it is sent on: it is
delivered when that transaction commits and never after a rollback. The
connection is ``conn=`` when given (a psycopg connection, sync or async, or a
Django connection), else Django's default connection when pgpubsub is an
installed Django app, else a per-thread autocommit connection to
``$PGPUBSUB_DSN``. Values always travel as bound parameters.

Driver errors (psycopg 3) become pgpubsub errors: a missing schema is
SchemaMissing, a refused privilege PermissionDenied, a closed or dropped
connection ConnectionLost.

Plain channels carry the JSON payload in the NOTIFY (at most 7999 bytes, else
PayloadTooLarge). Durable channels (``lock_notifications``) store the message
in the publisher's transaction and send only its id (no size limit): see
:mod:`pgpubsub.durable`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from . import _integration, _tracing, driver
from ._results import Handle, conninfo_of
from .channel import Channel, ChannelSpec, resolve_channel, spec_of
from .durable import Options, astore, store
from .errors import ConfigurationError
from .names import MAX_PAYLOAD_BYTES, NOTIFY_SQL, check_payload

__all__ = ["anotify", "notify", "notify_many"]

# The payloads travel as one text of JSON lines, split by the server: as fast as
# a binary array parameter, and unlike a text-format array (where each JSON
# payload is quoted and escaped, ~10 µs each) the same for every driver.
NOTIFY_MANY_SQL = (
    "SELECT pg_catalog.count(pg_catalog.pg_notify(%s, x)) "
    "FROM pg_catalog.unnest(pg_catalog.string_to_array(%s, E'\\n')) AS x"
)


def default_connection() -> Any:
    """Django's connection when pgpubsub is an installed app, else one per thread."""
    django_conn = _integration.django_connection()
    if django_conn is not None:
        return django_conn
    dsn = os.environ.get("PGPUBSUB_DSN")
    if not dsn:
        raise ConfigurationError("pass conn=..., or set PGPUBSUB_DSN, to publish")
    return driver.thread_connection(driver.build_conninfo(dsn))


def _payloads(spec: ChannelSpec, messages: Iterable[Any], plain: bool) -> tuple[str, int]:
    """The messages as JSON lines (checked against NOTIFY's limit on plain channels)."""
    lines, count = spec.encode_lines(messages)
    if plain and len(lines) * 4 > MAX_PAYLOAD_BYTES:
        for p in lines.split("\n"):  # only long ones can be over: count their UTF-8 bytes
            if len(p) * 4 > MAX_PAYLOAD_BYTES:
                check_payload(p, spec.name)
    return lines, count


#: Called with (channel, payloads) after each plain publish through this module:
#: pgpubsub.testing sees what a Django TestCase publishes, which is never committed.
plain_observers: list[Callable[[str, list[str]], None]] = []


def _observe(spec: ChannelSpec, payloads: list[str]) -> None:
    for observer in plain_observers:
        observer(spec.name, payloads)


def _execute(conn: Any, query: str, params: list[Any]) -> None:
    with conn.cursor() as cur:
        cur.execute(query, params)


@contextmanager
def _publishing(spec: ChannelSpec, count: int = 1) -> Iterator[str | None]:
    """A publish span (yielding its trace context); driver errors become pgpubsub errors."""
    with _tracing.publishing(spec.name, count) as trace:
        try:
            yield trace
        except psycopg.Error as exc:
            raise driver.translate(exc, f"publishing on {spec.path}") from exc


def _message(channel: Any, keywords: dict[str, Any]) -> tuple[ChannelSpec, Any, Options | None]:
    """(spec, the message's fields, publishing options) of a notify call.

    ``notify(Channel_or_path, **fields)``: the keywords are the fields.
    ``notify(channel_instance, **options)``: the keywords are publishing
    options, so they never collide with a field's name.
    """
    if isinstance(channel, Channel):
        spec = spec_of(type(channel))
        return spec, channel, Options.of(spec, keywords)
    return resolve_channel(channel), keywords, None


def _handle(spec: ChannelSpec, mid: int, conn: Any) -> int:
    """The id a durable publish returns: a :class:`Handle` on a results channel."""
    return Handle(mid, spec, conninfo_of(conn)) if spec.cls.results else mid


def notify(channel: Any, /, *, conn: Any = None, **keywords: Any) -> Any:
    """Publish one message; returns the stored message id on durable channels, else None.

    ``notify(Channel, **fields)`` or ``notify(Channel(...), delay=, run_at=, priority=,
    dedupe_key=, ordering_key=, limit_key=)`` (durable channels, :mod:`pgpubsub.durable`). On
    a channel with ``results=True`` the id is a :class:`~pgpubsub._results.Handle`
    (an ``int``) whose ``result()`` waits for the listener's return value.
    """
    spec, message, options = _message(channel, keywords)
    payload, _ = _payloads(spec, [message], plain=not spec.lock)
    conn = default_connection() if conn is None else conn
    with _publishing(spec) as trace:
        if spec.lock:
            return _handle(spec, store(conn, spec, payload, trace, options)[0], conn)
        _execute(conn, NOTIFY_SQL, [spec.name, payload])
    if plain_observers:
        _observe(spec, [payload])
    return None


def notify_many(
    channel: type[Any] | str, messages: Iterable[Any], *, conn: Any = None, **options: Any
) -> int:
    """Publish many messages (dicts of fields or channel instances) in one statement.

    ``options`` (durable channels) apply to every message. Returns how many
    were sent or stored (with a ``dedupe_key``: 1, the new or the pending one).
    """
    spec = resolve_channel(channel)
    checked = Options.of(spec, options)
    lines, count = _payloads(spec, messages, plain=not spec.lock)
    if not count:
        return 0
    conn = default_connection() if conn is None else conn
    with _publishing(spec, count) as trace:
        if spec.lock:
            return len(store(conn, spec, lines, trace, checked))
        _execute(conn, NOTIFY_MANY_SQL, [spec.name, lines])
    if plain_observers:
        _observe(spec, lines.split("\n"))
    return count


async def anotify(channel: Any, /, *, conn: psycopg.AsyncConnection[Any], **keywords: Any) -> Any:
    """:func:`notify` on an async psycopg connection."""
    spec, message, options = _message(channel, keywords)
    payload, _ = _payloads(spec, [message], plain=not spec.lock)
    with _publishing(spec) as trace:
        if spec.lock:
            return _handle(spec, (await astore(conn, spec, payload, trace, options))[0], conn)
        await conn.execute(NOTIFY_SQL, [spec.name, payload])
    if plain_observers:
        _observe(spec, [payload])
    return None
