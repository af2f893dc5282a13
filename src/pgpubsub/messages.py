"""Stored messages: list, inspect, replay, cancel and purge; pause and resume channels
(API and ``pgpubsub messages``).

Every function takes a DB-API connection (psycopg 3, psycopg2 or Django's) and
runs in its transaction; commit is the caller's, as with any write.

A ``channel`` is given as ``pgpubsub messages --channel`` takes it: the
channel's PostgreSQL name (``"emails"``), the dotted path of its class
(``"myapp.tasks.SendEmail"``, imported to read its name), or the class itself.
A dotted name whose module does not import is taken as a PostgreSQL name
(names may contain dots). :func:`known_channel` says whether the database has
ever seen a channel (the command line's check for a mistyped name).

Statuses: ``pending`` (waiting, or waiting for a retry), ``dead`` (attempts
exhausted; ``last_error`` has the traceback), ``done`` (completed, kept for the
channel's ``retention``), ``spill`` (a plain trigger channel's wide row), and
``"any"`` (each function's every status, as ``--status any``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from .channel import resolve_channel
from .driver import sqlstate
from .errors import ConfigurationError

__all__ = [
    "STATUSES",
    "CancelResult",
    "ReplayResult",
    "Skipped",
    "StoredMessage",
    "cancel",
    "count",
    "channel_name",
    "get",
    "known_channel",
    "list_messages",
    "pause",
    "paused",
    "purge",
    "replay",
    "resume",
]

STATUSES = ("pending", "dead", "done", "spill")
#: What ``status="any"`` means for :func:`replay`: every status that can be replayed.
REPLAYABLE = ("dead", "pending")
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
        raise ConfigurationError(
            f"unknown message status {status!r}: one of {', '.join(STATUSES)} or 'any'"
        )
    return status


def _statuses(status: str | Sequence[str], every: Sequence[str] = STATUSES) -> list[str]:
    """A status, ``"any"`` (``every``), or several, checked; never empty."""
    if isinstance(status, str):
        wanted = list(every) if status == "any" else [status]
    else:
        wanted = list(status)
    if not wanted:
        raise ConfigurationError("no message status given")
    return [s for s in wanted if _status(s)]


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def channel_name(channel: str | type[Any] | None) -> str | None:
    """The PostgreSQL name of a channel given by name, dotted path or class (None: None).

    A dotted path whose module imports must name a channel class there
    (ChannelNotFound otherwise); any other string is a PostgreSQL name.
    """
    if channel is None:
        return None
    if not isinstance(channel, str):
        return resolve_channel(channel).name
    module, _, attr = channel.rpartition(".")
    if module and attr and _module_exists(module):
        return resolve_channel(channel).name
    return channel


KNOWN_SQL = """
SELECT EXISTS (SELECT 1 FROM pgpubsub.message WHERE channel = %(c)s AND status = 'pending')
    OR EXISTS (SELECT 1 FROM pgpubsub.message WHERE channel = %(c)s AND status = 'dead')
    OR EXISTS (SELECT 1 FROM pgpubsub.message
               WHERE channel = %(c)s AND status IN ('done', 'spill'))
    OR EXISTS (SELECT 1 FROM pgpubsub.worker WHERE %(c)s = ANY (channels))
"""


def known_channel(conn: Any, channel: str | type[Any]) -> bool:
    """Whether the database has a stored message of the channel, or a worker listening on it.

    Each test reads one of the message table's partial indexes, so an unknown
    name costs index look-ups, not a scan of the table.
    """
    return bool(_rows(conn, KNOWN_SQL, {"c": channel_name(channel)})[0][0])


def _rows(conn: Any, query: str, params: Any) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return list(cur.fetchall())


# pgpubsub.message is partitioned (schema version 7): pgpubsub.rotate() moves
# a few pending rows to the current segment, and a statement that waited for
# such a row's lock cannot follow it to its new partition: it fails with a
# serialization failure (hostile review of issue 26, finding 5). Replay,
# cancel and purge are then run again, in a savepoint of the caller's
# transaction (a transaction of their own on an autocommit connection), as
# claims are.
MOVED_STATE = "40001"
#: How many times an operation is run again after a row moved under it.
MOVED_RETRIES = 20
#: The SQLSTATE of SAVEPOINT outside a transaction block (an autocommit connection).
NO_TRANSACTION = "25P01"


T = TypeVar("T")


def _moving(conn: Any, work: Callable[[], T]) -> T:
    """``work()``, run again when a row it waited for moved to another partition.

    In a savepoint of the caller's transaction, whose commit stays the
    caller's; on an autocommit connection, in a transaction of its own (the
    operation's statements commit together, as each would have alone). Any
    other error is raised as is, the savepoint rolled back.
    """
    own = False
    try:
        _execute(conn, "SAVEPOINT pgpubsub_moving")
    except Exception as exc:
        if sqlstate(exc) != NO_TRANSACTION:
            raise
        own = True
    for attempt in range(MOVED_RETRIES):
        if own:
            _execute(conn, "BEGIN")
        try:
            result = work()
        except Exception as exc:
            _execute(conn, "ROLLBACK" if own else "ROLLBACK TO SAVEPOINT pgpubsub_moving")
            if sqlstate(exc) != MOVED_STATE or attempt == MOVED_RETRIES - 1:
                if not own:
                    _execute(conn, "RELEASE SAVEPOINT pgpubsub_moving")
                raise
            continue
        _execute(conn, "COMMIT" if own else "RELEASE SAVEPOINT pgpubsub_moving")
        return result
    raise AssertionError("unreachable")


class _Attempts:
    """Statements run so that another transaction in the way undoes only the one it met.

    (A unique violation of a key taken meanwhile, a deadlock, a row changed
    after the caller's snapshot.) A statement that met a row pgpubsub.rotate()
    moved to another partition is run again at once when the caller's
    transaction is READ COMMITTED (the new statement's snapshot sees the row
    where it is now): the move changed nothing the caller could see, and is
    never reported as a change.

    In a savepoint of the caller's transaction (whose commit stays the
    caller's), or on an autocommit connection each a transaction of its own.
    Any other error is raised as is, the statement undone.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.in_transaction: bool | None = None  # not known before the first savepoint
        #: The SQLSTATE of the last statement that came back None.
        self.failed: str | None = None
        self._isolation: str | None = None

    def rows(self, query: str, params: Any) -> list[tuple[Any, ...]] | None:
        """The statement's rows, or None when another transaction got in its way."""
        for attempt in range(MOVED_RETRIES):
            rows = self._once(query, params)
            # In READ COMMITTED the only serialization failure is a row moved to
            # another partition meanwhile (a snapshot's own failures need
            # REPEATABLE READ or SERIALIZABLE).
            moved = self.failed == MOVED_STATE and self.isolation() == "read committed"
            if rows is not None or not moved or attempt == MOVED_RETRIES - 1:
                return rows
        raise AssertionError("unreachable")

    def _once(self, query: str, params: Any) -> list[tuple[Any, ...]] | None:
        self.failed = None
        if self.in_transaction is not False:
            try:
                _execute(self.conn, "SAVEPOINT pgpubsub_attempt")
                self.in_transaction = True
            except Exception as exc:
                if self.in_transaction or sqlstate(exc) != NO_TRANSACTION:
                    raise
                self.in_transaction = False
        try:
            rows = _rows(self.conn, query, params)
        except Exception as exc:
            if self.in_transaction:
                _execute(self.conn, "ROLLBACK TO SAVEPOINT pgpubsub_attempt")
                _execute(self.conn, "RELEASE SAVEPOINT pgpubsub_attempt")
            self.failed = sqlstate(exc)
            if self.failed in (UNIQUE_VIOLATION, DEADLOCK):
                return None
            # Under SERIALIZABLE the failure may come from its own checks (a write
            # skew): only a retry of the caller's whole transaction resolves it.
            if self.failed == SERIALIZATION_FAILURE and self.isolation() != "serializable":
                return None
            raise
        if self.in_transaction:
            _execute(self.conn, "RELEASE SAVEPOINT pgpubsub_attempt")
        return rows

    def isolation(self) -> str:
        """The caller's transaction's isolation level ("read committed" on an autocommit
        connection: each statement then has a snapshot of its own)."""
        if not self.in_transaction:
            return "read committed"
        if self._isolation is None:
            self._isolation = str(_rows(self.conn, ISOLATION_SQL, None)[0][0])
        return self._isolation


def _execute(conn: Any, statement: str) -> None:
    with conn.cursor() as cur:
        cur.execute(statement)


#: How often a transaction of its own (the dashboard's, the Django admin's) is run
#: again after a serialization failure.
OWN_TRANSACTION_TRIES = 3


def in_own_transaction(work: Callable[[], T]) -> T:
    """``work()``, which runs one operation here in a transaction of its own and commits it,
    run again after a serialization failure (a database whose transactions are
    SERIALIZABLE: the transaction's owner retries it, with a new snapshot)."""
    for attempt in range(OWN_TRANSACTION_TRIES):
        try:
            return work()
        except Exception as exc:
            if sqlstate(exc) != SERIALIZATION_FAILURE or attempt == OWN_TRANSACTION_TRIES - 1:
                raise
    raise AssertionError("unreachable")


def list_messages(
    conn: Any,
    status: str | Sequence[str] | None = "dead",
    channel: str | type[Any] | None = None,
    limit: int = 100,
) -> list[StoredMessage]:
    """Stored messages of a status (``"any"`` or None: any) and channel (None: any), oldest first.

    The first ``limit`` only (at least 1).
    """
    if limit < 1:
        raise ConfigurationError(f"limit must be at least 1, not {limit}")
    statuses = _statuses("any" if status is None else status)
    name = channel_name(channel)
    rows = _rows(
        conn,
        f"SELECT {COLUMNS} FROM pgpubsub.message "  # noqa: S608 - constant column list
        "WHERE status = ANY(%s) AND (%s::text IS NULL OR channel = %s) "
        "ORDER BY id LIMIT %s",
        (statuses, name, name, limit),
    )
    return [StoredMessage(*r) for r in rows]


def count(
    conn: Any,
    statuses: str | Sequence[str],
    channel: str | type[Any] | None = None,
    older_than: float | None = None,
    ids: list[int] | None = None,
) -> int:
    """How many stored messages :func:`purge` with these filters would delete.

    (``--dry-run``.) For :func:`replay` give its statuses (``"any"`` is
    ``REPLAYABLE`` there).
    """
    name = channel_name(channel)
    rows = _rows(
        conn,
        "SELECT pg_catalog.count(*) FROM pgpubsub.message WHERE status = ANY(%s) "
        "AND (%s::text IS NULL OR channel = %s) "
        "AND (%s::float8 IS NULL OR "
        "created_at < pg_catalog.now() - pg_catalog.make_interval(secs => %s)) "
        "AND (%s::bigint[] IS NULL OR id = ANY(%s))",
        (_statuses(statuses), name, name, older_than, older_than, ids, ids),
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
), firsts AS (
    -- the first dead message of each key asked for (one sort, not a scan of
    -- the asked messages per message)
    SELECT a.id, a.channel, a.status, a.dedupe_key,
        pg_catalog.min(a.id) FILTER (WHERE a.status = 'dead')
            OVER (PARTITION BY a.channel, a.dedupe_key) AS first
    FROM asked a
), verdict AS (
    SELECT a.id, a.channel, a.dedupe_key,
        (SELECT p.id FROM pgpubsub.message p
         WHERE a.status = 'dead' AND p.channel = a.channel AND p.dedupe_key = a.dedupe_key
           AND p.status = 'pending') AS holder,
        CASE WHEN a.status = 'dead' AND a.dedupe_key IS NOT NULL AND a.first < a.id
            THEN a.first END AS twin
    FROM firsts a
), replayed AS (
    -- a dead message goes to the ring's current segment (where claims look: the
    -- segment it was stored in may have been emptied since), a pending one stays
    UPDATE pgpubsub.message m SET status = 'pending', attempts = 0, run_at = pg_catalog.now(),
        segment = CASE WHEN m.status = 'pending' THEN m.segment
                       ELSE pgpubsub.current_segment() END
    FROM verdict v WHERE m.id = v.id AND v.holder IS NULL AND v.twin IS NULL
    RETURNING m.id
)
-- (IN: a hashed look-up; the join was a nested loop over both, n x m)
SELECT v.id, v.channel, v.dedupe_key, v.holder, v.twin, v.id IN (SELECT id FROM replayed)
FROM verdict v ORDER BY v.id
"""
# The statement cannot see a pending message of the key whose transaction has
# not committed (a publish, another replay): its update waits for that
# transaction at the unique index, then fails if it committed. The messages
# are then replayed one at a time, each run again until it sees its key's
# holder (on a busy channel the whole statement would meet a new one at each
# try). A snapshot older than the holder (the caller's REPEATABLE READ or
# SERIALIZABLE transaction) never sees it: the message is reported at once.
UNIQUE_VIOLATION = "23505"
# Replays of overlapping messages at once: one waits for the other's new
# pending message of a key at the unique index while that one waits for a row
# the first has locked. PostgreSQL fails one of them; it goes one at a time.
DEADLOCK = "40P01"
# A message another transaction changed (replayed, purged, completed) after
# the caller's REPEATABLE READ snapshot cannot be locked. (Under SERIALIZABLE
# the failure may come from its own checks instead: it is raised, for the
# caller to run its transaction again, as SERIALIZABLE asks of callers.)
SERIALIZATION_FAILURE = "40001"
#: How often one message is tried while other transactions get in its way.
KEY_TRIES = 5
CANDIDATES_SQL = """
SELECT id, channel, status, dedupe_key FROM pgpubsub.message
WHERE status = ANY(%(statuses)s)
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
  AND (%(channel)s::text IS NULL OR channel = %(channel)s)
ORDER BY id
"""
ISOLATION_SQL = "SELECT pg_catalog.current_setting('transaction_isolation')"
WAKE_SQL = "SELECT pg_catalog.pg_notify(c, '') FROM pg_catalog.unnest(%s::text[]) AS c"
WHERE_SQL = "SELECT id, status, channel FROM pgpubsub.message WHERE id = ANY(%s)"


def replay(
    conn: Any,
    ids: list[int] | None = None,
    channel: str | type[Any] | None = None,
    status: str | Sequence[str] = "dead",
) -> ReplayResult:
    """Make messages pending and due now, attempts reset, and wake the workers.

    Replays dead messages by default; ``status="pending"`` makes retries due at
    once, ``("dead", "pending")`` or ``"any"`` does both. With neither ``ids`` nor ``channel``
    every message of that status is replayed.

    Replays what it can and returns a :class:`ReplayResult`: the ids replayed,
    and each message left as it was with the reason. A dead message whose
    ``dedupe_key`` a pending message holds stays dead (two pending messages
    cannot share a key): "a pending message holds dedupe key 'k' (id 42)";
    of several dead messages of one key, the oldest is replayed and the
    others stay dead. A key taken by a publish that commits while replay
    runs is reported the same way; one whose holder the caller's REPEATABLE
    READ or SERIALIZABLE snapshot cannot see is reported as held "(committed
    after this transaction began)". Replay never fails because of another
    holder of a key. An id asked for that is not a message of that status
    (and channel) is reported too. ``int(result)`` is how many were replayed.
    In the caller's transaction, whose commit stays the caller's.
    """
    statuses = _statuses(status, REPLAYABLE)
    if any(s not in REPLAYABLE for s in statuses):
        raise ConfigurationError("only dead or pending messages can be replayed")
    channel = channel_name(channel)
    asked = {"statuses": statuses, "ids": ids, "channel": channel}
    attempts = _Attempts(conn)
    rows = attempts.rows(REPLAY_SQL, asked)
    skipped: list[Skipped] = []
    if rows is None:
        rows, skipped = _replay_each(attempts, asked)
    replayed, woken = [], set()
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
    seen = {int(r[0]) for r in rows} | {s.id for s in skipped}
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


def _replay_each(
    attempts: _Attempts, asked: dict[str, Any]
) -> tuple[list[tuple[Any, ...]], list[Skipped]]:
    """REPLAY_SQL's rows, message by message (some key was taken while the statement ran).

    The messages of a key taken meanwhile are reported with their holder;
    those the caller's snapshot cannot see as they are now, or that other
    transactions get in the way of at every try, are skipped with why. Of
    dead messages of one key, only the first goes back, as in one statement
    (on an autocommit connection it may have completed before the next).
    """
    conn = attempts.conn
    candidates = _rows(conn, CANDIDATES_SQL, asked)
    stale = attempts.isolation() != "read committed"  # a snapshot older than the statement
    rows: list[tuple[Any, ...]] = []
    skipped: list[Skipped] = []
    # (channel, key): the first dead message of the key, and what became of it:
    # a later one follows it (a twin of the one replayed, held by the same
    # holder, or left dead after the one that could not go back: whether that
    # one is gone or still dead, this transaction may not see; a replay in a
    # new one will)
    firsts: dict[tuple[str, str], _First] = {}
    for mid, name, status, key in candidates:
        first = firsts.get((name, key)) if status == "dead" else None
        if first is not None:
            if not first.tried:
                why = (
                    f"message {first.id} of the same dedupe key {key!r} comes first and "
                    "could not be replayed in this transaction: replay again"
                )
                skipped.append(Skipped(int(mid), why))
            elif first.holder is None:
                rows.append((mid, name, key, None, first.id, False))
            else:
                rows.append((mid, name, key, first.holder, None, False))
            continue
        got = None
        for _ in range(KEY_TRIES):
            got = attempts.rows(REPLAY_SQL, {**asked, "ids": [mid]})
            if got is not None or (stale and attempts.failed != DEADLOCK):
                break
        if got is None:
            skipped.append(Skipped(int(mid), _in_the_way(key, stale, attempts.failed)))
            if status == "dead" and key is not None:
                firsts[(name, key)] = _First(int(mid), tried=False)
            continue
        for row in got:
            if status == "dead" and key is not None:
                firsts[(name, key)] = _First(int(mid), holder=None if row[5] else row[3])
            rows.append(row)
    return rows, skipped


@dataclass(frozen=True)
class _First:
    """The first dead message of a key in a one-at-a-time replay, and what became of it."""

    id: int
    #: False: other transactions kept it from being tried to the end (it stays dead).
    tried: bool = True
    #: The pending message that holds the key (None: this one was replayed).
    holder: int | None = None


def _in_the_way(key: str | None, stale: bool, failed: str | None) -> str:
    """Why a message that other transactions got in the way of stays as it was."""
    if stale and failed == UNIQUE_VIOLATION:
        return (
            f"a pending message holds dedupe key {key!r} (committed after this "
            "transaction began)"
        )
    if stale and failed == SERIALIZATION_FAILURE:
        return "another transaction changed it after this transaction began"
    return (
        f"other transactions took its dedupe key {key!r} or locked it at each of "
        f"{KEY_TRIES} tries"
    )


def purge(
    conn: Any,
    status: str | Sequence[str] = "dead",
    channel: str | type[Any] | None = None,
    older_than: float | None = None,
    ids: list[int] | None = None,
) -> int:
    """Delete stored messages of a status (or several, or ``"any"``), optionally of a channel,
    older than seconds, or ids; return how many."""
    name = channel_name(channel)
    params = (_statuses(status), name, name, older_than, older_than, ids, ids)

    def delete() -> int:
        with conn.cursor() as cur:
            cur.execute(PURGE_SQL, params)
            return int(cur.rowcount)

    return _moving(conn, delete)


# The rows are locked in id order first, as replay locks them: in the order of
# a scan (channel by channel) a purge and a replay of the same messages could
# each hold one the other waited for, and PostgreSQL failed one of them.
PURGE_SQL = """
DELETE FROM pgpubsub.message WHERE id IN (
    SELECT id FROM pgpubsub.message WHERE status = ANY(%s)
      AND (%s::text IS NULL OR channel = %s)
      AND (%s::float8 IS NULL OR
           created_at < pg_catalog.now() - pg_catalog.make_interval(secs => %s))
      AND (%s::bigint[] IS NULL OR id = ANY(%s))
    ORDER BY id FOR UPDATE)
"""


class CancelResult(int):
    """How many pending messages :func:`cancel` cancelled; ``stopping``: the running ones
    whose listeners were asked to stop."""

    stopping: tuple[int, ...]

    def __new__(cls, cancelled: int, stopping: tuple[int, ...] = ()) -> CancelResult:
        result = super().__new__(cls, cancelled)
        result.stopping = stopping
        return result


#: Workers look at pgpubsub.cancel_request when a NOTIFY on this channel comes.
CANCEL_CHANNEL = "pgpubsub.cancel"
# The pending messages asked for that no worker handles: deleted. The others
# (locked by the transaction of the worker handling them) are asked to stop.
# A message in a worker's hands is unfinished (its claim set it; its outcome
# clears it): only those are passed over when locked. Another lock on a
# pending row is brief (a claim taking it, pgpubsub.rotate() moving it to
# another segment) and waited for: passing over a row rotate() was moving
# asked a listener that was not running to stop, and the message ran.
CANCEL_SQL = (
    "WITH held AS (SELECT id FROM pgpubsub.message WHERE status = 'pending' AND unfinished "
    "AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) "
    "AND (%(channel)s::text IS NULL OR channel = %(channel)s) "
    "FOR UPDATE SKIP LOCKED), "
    "waiting AS (SELECT id FROM pgpubsub.message WHERE status = 'pending' AND NOT unfinished "
    "AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) "
    "AND (%(channel)s::text IS NULL OR channel = %(channel)s) "
    "ORDER BY id FOR UPDATE) "
    "DELETE FROM pgpubsub.message m USING (SELECT id FROM held UNION ALL "
    "SELECT id FROM waiting) c WHERE m.id = c.id RETURNING m.id"
)
# Those still pending, unfinished and locked (claimed: in a worker's hands) are
# asked to stop; any other is new since, and left alone.
STOP_SQL = (
    "WITH asked AS (SELECT id FROM pgpubsub.message WHERE status = 'pending' AND unfinished "
    "AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) "
    "AND (%(channel)s::text IS NULL OR channel = %(channel)s)), "
    "free AS (SELECT id FROM pgpubsub.message WHERE id IN (SELECT id FROM asked) "
    "FOR UPDATE SKIP LOCKED), "
    "r AS (INSERT INTO pgpubsub.cancel_request (id) "
    "SELECT id FROM asked WHERE id NOT IN (SELECT id FROM free) "
    "ON CONFLICT (id) DO NOTHING RETURNING id) "
    "SELECT id, pg_catalog.pg_notify(%(wake)s, '') FROM r ORDER BY id"
)
# Requests whose message ended (done, dead, cancelled, purged) meanwhile.
STALE_SQL = (
    "DELETE FROM pgpubsub.cancel_request r WHERE NOT EXISTS "
    "(SELECT FROM pgpubsub.message m WHERE m.id = r.id AND m.status = 'pending')"
)


def cancel(
    conn: Any, ids: list[int] | None = None, channel: str | type[Any] | None = None
) -> CancelResult:
    """Cancel messages so they never run (again); return how many pending ones were cancelled.

    Give ``ids``, a ``channel``, or both (neither: ConfigurationError). A
    pending message is deleted. One that a worker is handling right now is not
    waited for: its listener is asked to stop (``durable.cancellation()``; an
    async listener is cancelled), and once it returns or raises the message
    ends cancelled, its writes undone; if it completes first, it stays done.
    Those are in ``result.stopping``.
    """
    if ids is None and channel is None:
        raise ConfigurationError("cancel needs message ids, a channel, or both")
    params: dict[str, Any] = {"ids": ids, "channel": channel_name(channel)}
    params["wake"] = CANCEL_CHANNEL

    def run() -> CancelResult:
        cancelled = [r[0] for r in _rows(conn, CANCEL_SQL, params)]
        with conn.cursor() as cur:
            cur.execute(STALE_SQL)
        stopping = tuple(r[0] for r in _rows(conn, STOP_SQL, params))
        return CancelResult(len(cancelled), stopping)

    return _moving(conn, run)


PAUSE_SQL = (
    "INSERT INTO pgpubsub.channel_pause (channel) VALUES (%s) "
    "ON CONFLICT (channel) DO NOTHING RETURNING channel"
)
RESUME_SQL = "DELETE FROM pgpubsub.channel_pause WHERE channel = %s RETURNING channel"
PAUSED_SQL = "SELECT channel, paused_at FROM pgpubsub.channel_pause ORDER BY channel"


def _required(channel: str | type[Any]) -> str:
    name = channel_name(channel)
    if not name:
        raise ConfigurationError("pause and resume need a channel")
    return name


def pause(conn: Any, channel: str | type[Any]) -> bool:
    """Pause a durable channel across every worker; return whether it was running until now.

    From the commit on, no worker starts a message of the channel (the claim
    checks it, for messages with and without ordering keys); its messages are
    kept, and publishing goes on. A batch a worker claimed before the commit
    finishes. The pause is a row in the database: it outlives worker and
    server restarts, until :func:`resume`. Workers of a paused channel cost
    nothing while they wait (they sleep until a wake-up or their poll).
    """
    return bool(_rows(conn, PAUSE_SQL, (_required(channel),)))


def resume(conn: Any, channel: str | type[Any]) -> bool:
    """Resume a paused channel; return whether it was paused.

    Its workers are woken at commit (a NOTIFY on the channel) and take its
    messages again, in the order they would have without the pause.
    """
    name = _required(channel)
    changed = bool(_rows(conn, RESUME_SQL, (name,)))
    if changed:
        _rows(conn, WAKE_SQL, ([name],))
    return changed


def paused(conn: Any) -> dict[str, datetime]:
    """The paused channels, with when each was paused."""
    return {r[0]: r[1] for r in _rows(conn, PAUSED_SQL, ())}
