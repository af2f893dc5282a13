"""Stored messages: list, inspect, replay and purge (API and ``pgpubsub messages``).

Every function takes a DB-API connection (psycopg 3, psycopg2 or Django's) and
runs in its transaction; commit is the caller's, as with any write. Channels
are PostgreSQL channel names (``spec_of(MyChannel).name``).

Statuses: ``pending`` (waiting, or waiting for a retry), ``dead`` (attempts
exhausted; ``last_error`` has the traceback), ``done`` (completed, kept for the
channel's ``retention``), ``spill`` (a plain trigger channel's wide row).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "STATUSES",
    "StoredMessage",
    "cancel",
    "count",
    "get",
    "list_messages",
    "purge",
    "replay",
]

STATUSES = ("pending", "dead", "done", "spill")
COLUMNS = (
    "id, channel, payload, status, attempts, run_at, last_error, context, created_at, completed_at"
)


@dataclass(frozen=True)
class StoredMessage:
    id: int
    channel: str
    payload: str
    status: str
    attempts: int
    run_at: datetime
    last_error: str | None
    context: Any
    created_at: datetime
    completed_at: datetime | None


def _status(status: str | None) -> str | None:
    if status is not None and status not in STATUSES:
        raise ConfigurationError(f"unknown message status {status!r}: one of {', '.join(STATUSES)}")
    return status


def _rows(conn: Any, query: str, params: Any) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return list(cur.fetchall())


def list_messages(
    conn: Any, status: str | None = "dead", channel: str | None = None, limit: int = 100
) -> list[StoredMessage]:
    """Stored messages of a status (None: any) and channel (None: any), oldest first."""
    rows = _rows(
        conn,
        f"SELECT {COLUMNS} FROM pgpubsub.message "  # noqa: S608 - constant column list
        "WHERE (%s::text IS NULL OR status = %s) AND (%s::text IS NULL OR channel = %s) "
        "ORDER BY id LIMIT %s",
        (_status(status), status, channel, channel, limit),
    )
    return [StoredMessage(*r) for r in rows]


def count(
    conn: Any,
    statuses: tuple[str, ...] | list[str],
    channel: str | None = None,
    older_than: float | None = None,
    ids: list[int] | None = None,
) -> int:
    """How many stored messages :func:`replay` or :func:`purge` with these filters would change."""
    rows = _rows(
        conn,
        "SELECT pg_catalog.count(*) FROM pgpubsub.message WHERE status = ANY(%s) "
        "AND (%s::text IS NULL OR channel = %s) "
        "AND (%s::float8 IS NULL OR "
        "created_at < pg_catalog.now() - pg_catalog.make_interval(secs => %s)) "
        "AND (%s::bigint[] IS NULL OR id = ANY(%s))",
        ([_status(s) for s in statuses], channel, channel, older_than, older_than, ids, ids),
    )
    return int(rows[0][0])


def get(conn: Any, message_id: int) -> StoredMessage | None:
    rows = _rows(
        conn,
        f"SELECT {COLUMNS} FROM pgpubsub.message WHERE id = %s",  # noqa: S608
        (message_id,),
    )
    return StoredMessage(*rows[0]) if rows else None


def replay(
    conn: Any,
    ids: list[int] | None = None,
    channel: str | None = None,
    status: str | tuple[str, ...] = "dead",
) -> int:
    """Make messages pending and due now, attempts reset, and wake the workers.

    Replays dead messages by default; ``status="pending"`` makes retries due at
    once, ``("dead", "pending")`` does both. With neither ``ids`` nor ``channel``
    every message of that status is replayed. Returns how many.
    """
    statuses = [status] if isinstance(status, str) else list(status)
    if not statuses or any(_status(s) not in ("dead", "pending") for s in statuses):
        raise ConfigurationError("only dead or pending messages can be replayed")
    rows = _rows(
        conn,
        "WITH r AS (UPDATE pgpubsub.message SET status = 'pending', attempts = 0, "
        "run_at = pg_catalog.now() WHERE status = ANY(%s) "
        "AND (%s::bigint[] IS NULL OR id = ANY(%s)) "
        "AND (%s::text IS NULL OR channel = %s) RETURNING channel) "
        "SELECT channel, pg_catalog.count(*), pg_catalog.pg_notify(channel, '') "
        "FROM r GROUP BY channel",
        (statuses, ids, ids, channel, channel),
    )
    return sum(int(r[1]) for r in rows)


def purge(
    conn: Any,
    status: str = "dead",
    channel: str | None = None,
    older_than: float | None = None,
    ids: list[int] | None = None,
) -> int:
    """Delete stored messages of a status, optionally of a channel, older than seconds, or ids."""
    with conn.cursor() as cur:
        cur.execute(
            "DELETE FROM pgpubsub.message WHERE status = %s "
            "AND (%s::text IS NULL OR channel = %s) "
            "AND (%s::float8 IS NULL OR "
            "created_at < pg_catalog.now() - pg_catalog.make_interval(secs => %s)) "
            "AND (%s::bigint[] IS NULL OR id = ANY(%s))",
            (_status(status), channel, channel, older_than, older_than, ids, ids),
        )
        return int(cur.rowcount)


def cancel(conn: Any, ids: list[int] | None = None, channel: str | None = None) -> int:
    """Delete pending messages so they never run; return how many.

    Give ``ids``, a ``channel``, or both (neither: ConfigurationError). A
    message a worker is handling right now is not cancelled (it is skipped, not
    waited for): it completes, or fails and stays pending; cancel it again then.
    """
    if ids is None and channel is None:
        raise ConfigurationError("cancel needs message ids, a channel, or both")
    rows = _rows(
        conn,
        "WITH c AS (SELECT id FROM pgpubsub.message WHERE status = 'pending' "
        "AND (%s::bigint[] IS NULL OR id = ANY(%s)) AND (%s::text IS NULL OR channel = %s) "
        "FOR UPDATE SKIP LOCKED) "
        "DELETE FROM pgpubsub.message m USING c WHERE m.id = c.id RETURNING m.id",
        (ids, ids, channel, channel),
    )
    return len(rows)
