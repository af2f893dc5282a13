"""Publishing on typed channels: ``pgpubsub.notify(Channel_or_path, **fields)``.

The message joins the transaction of the connection it is sent on: it is
delivered when that transaction commits and never after a rollback. The
connection is ``conn=`` when given (a psycopg connection, sync or async, or a
Django connection), else Django's default connection when pgpubsub is an
installed Django app, else a per-thread autocommit connection to
``$PGPUBSUB_DSN``. Values always travel as bound parameters.

Plain channels carry the JSON payload in the NOTIFY (at most 7999 bytes, else
PayloadTooLarge). Durable channels (``lock_notifications``) store the message
in the publisher's transaction and send only its id (no size limit): see
:mod:`pgpubsub.durable`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

import psycopg

from . import driver
from .channel import ChannelSpec, resolve_channel
from .errors import ConfigurationError
from .names import NOTIFY_SQL, check_payload

__all__ = ["anotify", "notify", "notify_many"]

NOTIFY_MANY_SQL = "SELECT pg_catalog.pg_notify(%s, x) FROM unnest(%s::text[]) AS x"

_local = threading.local()


def default_connection() -> Any:
    """Django's connection when pgpubsub is an installed app, else one per thread."""
    from . import integration

    django_conn = integration.django_connection()
    if django_conn is not None:
        return django_conn
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        dsn = os.environ.get("PGPUBSUB_DSN")
        if not dsn:
            raise ConfigurationError("pass conn=..., or set PGPUBSUB_DSN, to publish")
        conn = _local.conn = driver.connect(driver.build_conninfo(dsn))
    return conn


def _payloads(spec: ChannelSpec, messages: Iterable[Any]) -> list[str]:
    out = []
    for m in messages:
        message = spec.build(m) if isinstance(m, dict) else m
        if not isinstance(message, spec.cls):
            raise ConfigurationError(f"{message!r} is not a {spec.path} or a dict of its fields")
        out.append(spec.encode(message))
    return out


def _execute(conn: Any, query: str, params: list[Any]) -> None:
    with conn.cursor() as cur:
        cur.execute(query, params)


def notify(channel: type[Any] | str, /, *, conn: Any = None, **fields: Any) -> Any:
    """Publish one message; returns the stored message id on durable channels, else None."""
    spec = resolve_channel(channel)
    (payload,) = _payloads(spec, [fields])
    conn = default_connection() if conn is None else conn
    if spec.lock:
        from .durable import store

        return store(conn, spec, [payload])[0]
    _execute(conn, NOTIFY_SQL, [spec.name, check_payload(payload, spec.name)])
    return None


def notify_many(channel: type[Any] | str, messages: Iterable[Any], *, conn: Any = None) -> int:
    """Publish many messages (dicts of fields or channel instances) in one statement."""
    spec = resolve_channel(channel)
    payloads = _payloads(spec, messages)
    conn = default_connection() if conn is None else conn
    if spec.lock:
        from .durable import store

        return len(store(conn, spec, payloads))
    for p in payloads:
        check_payload(p, spec.name)
    _execute(conn, NOTIFY_MANY_SQL, [spec.name, payloads])
    return len(payloads)


async def anotify(
    channel: type[Any] | str, /, *, conn: psycopg.AsyncConnection[Any], **fields: Any
) -> Any:
    """:func:`notify` on an async psycopg connection."""
    spec = resolve_channel(channel)
    (payload,) = _payloads(spec, [fields])
    if spec.lock:
        from .durable import astore

        return (await astore(conn, spec, [payload]))[0]
    await conn.execute(NOTIFY_SQL, [spec.name, check_payload(payload, spec.name)])
    return None
