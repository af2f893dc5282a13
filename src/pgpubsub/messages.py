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
    "ReplayResult",
    "Skipped",
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


@dataclass(frozen=True)
class Skipped:
    """A message :func:`replay` left as it was, and why."""

    id: int
    reason: str


@dataclass(frozen=True)
class ReplayResult:
    """What :func:`replay` did: the ids it replayed, and each message it could not, with why.

    ``int(result)`` is how many were replayed (what ``replay`` returned before).
    """

    replayed: tuple[int, ...]
    skipped: tuple[Skipped, ...] = ()

    def __int__(self) -> int:
        return len(self.replayed)

    def lines(self) -> list[str]:
        """The result as text, one line each: the count, then each skipped message."""
        return [f"replayed {len(self.replayed)} message(s)"] + [
            f"skipped {s.id}: {s.reason}" for s in self.skipped
        ]


# Replays what can be, in one statement. A dead message whose dedupe_key a
# pending message holds (a newer publish, or a replayed twin) would break the
# unique index: it stays dead, and the holder is named. Among dead messages of
# one key replayed together, the oldest goes back.
REPLAY_SQL = """
WITH asked AS (
    SELECT id, channel, status, dedupe_key FROM pgpubsub.message
    WHERE status = ANY(%(statuses)s)
      AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
      AND (%(channel)s::text IS NULL OR channel = %(channel)s)
    ORDER BY id FOR UPDATE
), verdict AS (
    SELECT a.id, a.channel, a.dedupe_key,
        (SELECT p.id FROM pgpubsub.message p
         WHERE a.status = 'dead' AND p.channel = a.channel AND p.dedupe_key = a.dedupe_key
           AND p.status = 'pending') AS holder,
        (SELECT pg_catalog.min(t.id) FROM asked t
         WHERE a.status = 'dead' AND t.status = 'dead' AND t.channel = a.channel
           AND t.dedupe_key = a.dedupe_key AND t.id < a.id) AS twin
    FROM asked a
), replayed AS (
    UPDATE pgpubsub.message m SET status = 'pending', attempts = 0, run_at = pg_catalog.now()
    FROM verdict v WHERE m.id = v.id AND v.holder IS NULL AND v.twin IS NULL
    RETURNING m.id
)
SELECT v.id, v.channel, v.dedupe_key, v.holder, v.twin, r.id IS NOT NULL
FROM verdict v LEFT JOIN replayed r ON r.id = v.id ORDER BY v.id
"""
WAKE_SQL = "SELECT pg_catalog.pg_notify(c, '') FROM pg_catalog.unnest(%s::text[]) AS c"
WHERE_SQL = "SELECT id, status, channel FROM pgpubsub.message WHERE id = ANY(%s)"


def replay(
    conn: Any,
    ids: list[int] | None = None,
    channel: str | None = None,
    status: str | tuple[str, ...] = "dead",
) -> ReplayResult:
    """Make messages pending and due now, attempts reset, and wake the workers.

    Replays dead messages by default; ``status="pending"`` makes retries due at
    once, ``("dead", "pending")`` does both. With neither ``ids`` nor ``channel``
    every message of that status is replayed.

    Replays what it can and returns a :class:`ReplayResult`: the ids replayed,
    and each message left as it was with the reason. A dead message whose
    ``dedupe_key`` a pending message holds stays dead (two pending messages
    cannot share a key): "a pending message holds dedupe key 'k' (id 42)";
    of several dead messages of one key, the oldest is replayed and the
    others stay dead. An id asked for that is not a message of that status
    (and channel) is reported too. ``int(result)`` is how many were replayed.
    """
    statuses = [status] if isinstance(status, str) else list(status)
    if not statuses or any(_status(s) not in ("dead", "pending") for s in statuses):
        raise ConfigurationError("only dead or pending messages can be replayed")
    rows = _rows(conn, REPLAY_SQL, {"statuses": statuses, "ids": ids, "channel": channel})
    replayed, skipped, woken = [], [], set()
    for mid, name, key, holder, twin, done in rows:
        if done:
            replayed.append(int(mid))
            woken.add(name)
        elif holder is not None:
            why = f"a pending message holds dedupe key {key!r} (id {holder})"
            skipped.append(Skipped(int(mid), why))
        else:
            why = f"message {twin} of the same dedupe key {key!r} is replayed instead"
            skipped.append(Skipped(int(mid), why))
    if woken:
        _rows(conn, WAKE_SQL, (sorted(woken),))
    seen = {int(r[0]) for r in rows}
    missing = [i for i in dict.fromkeys(ids or ()) if i not in seen]
    if missing:
        found = {int(r[0]): r[1:] for r in _rows(conn, WHERE_SQL, (missing,))}
        for mid in missing:
            skipped.append(Skipped(mid, _not_replayable(found.get(mid), statuses, channel)))
    return ReplayResult(tuple(replayed), tuple(sorted(skipped, key=lambda s: s.id)))


def _not_replayable(found: tuple[Any, ...] | None, statuses: list[str], channel: str | None) -> str:
    """Why an id asked for was not among the messages to replay."""
    if found is None:
        return "no such message"
    status, name = found
    if channel is not None and name != channel:
        return f"it is on channel {name!r}, not {channel!r}"
    return f"it is {status}, not {' or '.join(statuses)}"


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
