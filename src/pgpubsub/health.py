"""What ``pgpubsub status`` shows: :func:`status` and the :class:`Health` it returns.

::

    health = pgpubsub.status(dsn)
    health.problems(max_age=300)   # [] when the database is reachable, the schema
                                   # current and no due message waited over 300 s

``status`` never raises for the conditions it reports: an unreachable
database or a missing schema is in the result (``reachable``, ``schema_version``).

Each pending message is in one of four states (:class:`ChannelCounts`):

* **in flight**: a worker claimed it and its outcome is not recorded yet (its
  listener runs, or its worker died and it waits for its claim to lapse);
* **scheduled**: its ``run_at`` is to come (a delay, or a retry's backoff);
* **held**: due, but no worker may take it yet: an older pending message of
  its ordering key exists or its key is leased live (one message per key at
  a time), or every ``max_in_flight`` slot of its channel is leased live (the
  limit as a live worker of the channel declares it in the registry);
* **due**: waiting for a worker, nothing else (on a paused channel, for resume:
  ``ChannelCounts.paused``). "Oldest due" is the age of the
  oldest of these: what ``--max-age`` checks.

Counts are exact (one pass over ``pgpubsub.message``); the held test is an
index probe per due message with an ordering key (or on a full channel).
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psycopg

from . import driver
from ._heartbeat import GONE_AFTER
from ._leases import LIVE

__all__ = ["SCHEMA_VERSION", "ChannelCounts", "Health", "WorkerInfo", "age", "since", "status"]

#: The schema version this library installs and expects (``pgpubsub.version``).
SCHEMA_VERSION = 7

# A due message of row ``m`` held back by its ordering key: an older pending
# message of its key, or a live lease of the key (the negation of the claim's
# KEY_FREE in processor.py: keep them in step). Index probes of
# message_ordering_idx and of the lease's primary key.
KEY_HELD = f"""(m.ordering_key IS NOT NULL AND (
    EXISTS (
        SELECT 1 FROM pgpubsub.message o
        WHERE o.channel = m.channel AND o.ordering_key = m.ordering_key
          AND o.status = 'pending' AND o.id < m.id)
    OR EXISTS (
        SELECT 1 FROM pgpubsub.lease l
        WHERE l.channel = m.channel AND l.kind = 'key' AND l.name = m.ordering_key
          AND {LIVE})))"""  # noqa: S608 - constant fragments
# The channels whose max_in_flight slots are all leased live. The limit is not
# in the database: live workers declare it in their registry row (the smallest
# one when they disagree, the one that lets no more in).
FULL_SQL = f"""
SELECT x.channel FROM (
    SELECT s.key AS channel, pg_catalog.min((s.value ->> 'max_in_flight')::integer) AS slots
    FROM pgpubsub.worker w,
        pg_catalog.jsonb_each(COALESCE(pg_catalog.to_jsonb(w) -> 'stats', '{{}}')) s
    WHERE w.last_seen >= pg_catalog.now() - pg_catalog.make_interval(secs => {GONE_AFTER})
      AND pg_catalog.jsonb_typeof(s.value) = 'object'
      AND (s.value ->> 'max_in_flight') IS NOT NULL
    GROUP BY s.key
) x
WHERE x.slots <= (
    SELECT pg_catalog.count(*) FROM pgpubsub.lease l
    WHERE l.channel = x.channel AND l.kind = 'slot' AND {LIVE})
"""  # noqa: S608 - constant fragments


def state_sql(full: str) -> str:
    """The state of pending row ``m``: in_flight, scheduled, held or due.

    ``full``: an SQL boolean, true when the channel's max_in_flight slots are
    all leased live. The held test runs only for due messages (CASE keeps the
    order), so in-flight and scheduled ones cost no probe.
    """
    return (
        "CASE WHEN m.unfinished THEN 'in_flight' "
        "WHEN m.run_at > pg_catalog.now() THEN 'scheduled' "
        f"WHEN {full} OR {KEY_HELD} THEN 'held' ELSE 'due' END"
    )


# One pass over the table (a sequential scan reads it faster than per-channel
# index scans of the pending, dead and kept rows); the held test is an index
# probe, run only for due messages with an ordering key or on a full channel.
COUNTS_SQL = f"""
WITH full_channel AS ({FULL_SQL})
SELECT x.channel,
    pg_catalog.count(*) FILTER (WHERE x.status = 'pending'),
    pg_catalog.count(*) FILTER (WHERE x.s = 'due'),
    pg_catalog.count(*) FILTER (WHERE x.status = 'dead'),
    pg_catalog.count(*) FILTER (WHERE x.status = 'done'),
    pg_catalog.date_part('epoch', pg_catalog.now() - pg_catalog.min(x.run_at)
        FILTER (WHERE x.s = 'due')),
    pg_catalog.count(*) FILTER (WHERE x.s = 'in_flight'),
    pg_catalog.count(*) FILTER (WHERE x.s = 'held')
FROM (
    SELECT m.channel, m.status, m.run_at,
        CASE WHEN m.status = 'pending' THEN {state_sql("f.channel IS NOT NULL")} END AS s
    FROM pgpubsub.message m LEFT JOIN full_channel f ON f.channel = m.channel
    WHERE m.status <> 'spill'
) x
GROUP BY x.channel ORDER BY x.channel
"""  # noqa: S608 - constant fragments
# A schema before version 4 has no leases and no unfinished column: nothing is
# told apart there (in flight and held count as due, as they did then).
LEGACY_COUNTS_SQL = """
SELECT channel,
    pg_catalog.count(*) FILTER (WHERE status = 'pending'),
    pg_catalog.count(*) FILTER (WHERE status = 'pending' AND run_at <= pg_catalog.now()),
    pg_catalog.count(*) FILTER (WHERE status = 'dead'),
    pg_catalog.count(*) FILTER (WHERE status = 'done'),
    pg_catalog.date_part('epoch', pg_catalog.now() - pg_catalog.min(run_at)
        FILTER (WHERE status = 'pending' AND run_at <= pg_catalog.now()))
FROM pgpubsub.message WHERE status <> 'spill' GROUP BY channel ORDER BY channel
"""
# The per-channel counts (schema version 3) are read through to_jsonb: NULL on
# a version-2 table, which has no such column.
WORKERS_SQL = """
SELECT id, host, pid, version, channels, started_at, last_seen, processed, failed,
    last_seen >= pg_catalog.now() - pg_catalog.make_interval(secs => %(gone)s),
    COALESCE(pg_catalog.to_jsonb(w) -> 'stats', '{}')
FROM pgpubsub.worker w ORDER BY host, pid LIMIT %(limit)s
"""
#: At most this many workers are read.
MAX_WORKERS = 1000
VERSION_SQL = "SELECT version FROM pgpubsub.version"
# Schema version 5: the paused channels (read when the table is there: a
# version-5 schema migrated before it existed has none).
PAUSED_SQL = "SELECT channel FROM pgpubsub.channel_pause"
HAS_PAUSE_SQL = "SELECT pg_catalog.to_regclass('pgpubsub.channel_pause') IS NOT NULL"
TIMEOUT_SQL = "SELECT pg_catalog.set_config('statement_timeout', %s, false)"
# to_regclass: NULL instead of an error when the table is not there.
# What holds the xmin horizon back (vacuum keeps every row deleted since): a
# session of this database in a transaction older than %(age)s seconds, a
# prepared transaction, a replication slot (a standby's hot_standby_feedback).
# Other sessions' transactions are visible to a superuser or a member of
# pg_read_all_stats (pg_monitor); to others, only their own.
HORIZON_SQL = """
SELECT 'session ' || a.pid || ' ('
        || COALESCE(NULLIF(a.application_name, ''), 'no application name')
        || ', ' || COALESCE(a.usename, '?') || ', ' || COALESCE(a.state, '?') || ')',
    pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() - a.xact_start)
FROM pg_catalog.pg_stat_activity a
WHERE a.datname = pg_catalog.current_database() AND a.pid <> pg_catalog.pg_backend_pid()
  AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
  AND a.xact_start < pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => %(age)s)
UNION ALL
SELECT 'prepared transaction ' || pg_catalog.quote_literal(p.gid),
    pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() - p.prepared)
FROM pg_catalog.pg_prepared_xacts p
WHERE p.database = pg_catalog.current_database()
  AND p.prepared < pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => %(age)s)
UNION ALL
SELECT 'replication slot ' || pg_catalog.quote_literal(s.slot_name)
        || CASE WHEN s.active THEN '' ELSE ' (inactive)' END, NULL
FROM pg_catalog.pg_replication_slots s WHERE s.xmin IS NOT NULL
ORDER BY 2 DESC NULLS LAST
"""
# The NOTIFY queue: the fraction in use (a listener that never reads holds
# every notification sent since it listened; a full queue fails every
# notifying commit), and its size where it can be set (PostgreSQL 17+).
NOTIFY_QUEUE_SQL = (
    "SELECT pg_catalog.pg_notification_queue_usage(), "
    "pg_catalog.current_setting('max_notify_queue_pages', true)"
)
#: status() warns when the NOTIFY queue is fuller than this fraction.
NOTIFY_QUEUE_WARN = 0.5
#: status() warns about transactions older than this many seconds (``horizon_age``).
HORIZON_AGE = 60.0
TABLES_SQL = (
    "SELECT pg_catalog.to_regclass('pgpubsub.message') IS NOT NULL, "
    "pg_catalog.to_regclass('pgpubsub.version') IS NOT NULL, "
    "pg_catalog.to_regclass('pgpubsub.worker') IS NOT NULL"
)


@dataclass(frozen=True)
class ChannelCounts:
    """A channel's messages by state; ``pending`` is the total of the first four
    (in flight + held + due + :attr:`scheduled`)."""

    channel: str
    pending: int  # every pending message: in flight, held, due and scheduled
    due: int  # waiting for a worker, and only for that
    dead: int
    done: int  # kept for the channel's retention
    oldest_due_age: float | None  # seconds the oldest due message has waited; None: none due
    in_flight: int = 0  # claimed, outcome not recorded yet (or its worker died mid-attempt)
    held: int = 0  # due, held back by its ordering key or by the channel's max_in_flight
    paused: bool = False  # paused (messages.pause): no worker starts its messages

    @property
    def scheduled(self) -> int:
        """Pending messages whose time is to come (delays, retries' backoff)."""
        return self.pending - self.in_flight - self.held - self.due


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    version: str
    channels: tuple[str, ...]
    started_at: datetime.datetime
    last_seen: datetime.datetime
    processed: int
    failed: int
    alive: bool  # heartbeat within GONE_AFTER seconds
    # Per channel: {"kind", "durable", "processed", "failed"} (schema version 3).
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        """What stopped in this worker (a channel's scheduler...), from its registry row."""
        return [str(c["error"]) for c in self.stats.values() if c.get("error")]

    @property
    def warnings(self) -> list[str]:
        """What this worker cannot do though it runs (free stored messages' space)."""
        return [str(c["warning"]) for c in self.stats.values() if c.get("warning")]

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> WorkerInfo:
        """One row of :data:`WORKERS_SQL`."""
        wid, host, pid, version, channels, started, seen, processed, failed, alive, stats = row
        return cls(
            wid, host, pid, version, tuple(channels), started, seen, processed, failed, alive, stats
        )


WORKERS_PARAMS = {"gone": GONE_AFTER, "limit": MAX_WORKERS}


@dataclass(frozen=True)
class Health:
    reachable: bool
    error: str | None  # why the database or the schema cannot be read
    server_version: str | None
    schema_version: int | None  # None: the schema is not installed
    expected_version: int
    channels: tuple[ChannelCounts, ...] = ()
    workers: tuple[WorkerInfo, ...] = ()
    # What the server does that slows the queue down (a transaction holding
    # vacuum back, a filling NOTIFY queue): shown, never a failed check.
    warnings: tuple[str, ...] = ()
    notify_queue_usage: float | None = None  # fraction of the NOTIFY queue in use

    @property
    def schema_current(self) -> bool:
        return self.schema_version is not None and self.schema_version >= self.expected_version

    def problems(self, max_age: float | None = None) -> list[str]:
        """What makes this unhealthy (empty when healthy); ``max_age``: seconds a due message
        may wait (on a channel that is not paused: a pause is meant). A live worker whose
        background task (a scheduler) stopped is a problem."""
        if not self.reachable:
            return [f"database unreachable: {self.error}"]
        if self.schema_version is None:
            return ["the pgpubsub schema is not installed: run `pgpubsub migrate`"]
        if not self.schema_current:
            return [
                f"the pgpubsub schema is at version {self.schema_version}, this library needs "
                f"{self.expected_version}: run `pgpubsub migrate`"
            ]
        stopped = [
            f"worker {w.host}:{w.pid}: {error}"
            for w in self.workers
            if w.alive
            for error in w.errors
        ]
        if max_age is None:
            return stopped
        # Only due messages: one in a listener or held back by its key or a
        # limit is not waiting for a worker.
        return stopped + [
            f"{c.channel}: the oldest due message has waited {c.oldest_due_age:.0f}s "
            f"(more than {max_age:g}s)"
            for c in self.channels
            if c.oldest_due_age is not None and c.oldest_due_age > max_age and not c.paused
        ]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema_current"] = self.schema_current
        return data


def status(dsn: str = "", *, timeout: float = 5.0, horizon_age: float = HORIZON_AGE) -> Health:
    """Database, schema, per-channel counts and live workers (``pgpubsub status``).

    ``warnings`` names what holds vacuum back (a transaction of this database
    open for more than ``horizon_age`` seconds, a prepared transaction, a
    replication slot), a NOTIFY queue fuller than :data:`NOTIFY_QUEUE_WARN`, and
    what a live worker says it cannot do (a role that may not call
    ``pgpubsub.rotate()``, granted before schema version 7).
    """
    conninfo = driver.build_conninfo(dsn)
    try:
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=max(1, int(timeout)))
    except psycopg.Error as exc:
        return Health(False, driver.one_line(exc), None, None, SCHEMA_VERSION)
    with conn:
        try:
            conn.execute(TIMEOUT_SQL, (str(int(timeout * 1000)),))
            return _read(conn, horizon_age)
        except psycopg.Error as exc:
            raise driver.translate(exc, "reading the status") from exc


def _server_warnings(
    conn: psycopg.Connection[Any], horizon_age: float
) -> tuple[list[str], float | None]:
    warnings = [
        f"{holder} has held a transaction open for {age(seconds)}: "
        "vacuum keeps every row deleted since, and the queue slows down"
        if seconds is not None
        else f"{holder} holds the xmin horizon back: vacuum keeps every row deleted since"
        for holder, seconds in conn.execute(HORIZON_SQL, {"age": horizon_age})
    ]
    row = conn.execute(NOTIFY_QUEUE_SQL).fetchone()
    usage, pages = (float(row[0]), row[1]) if row else (None, None)
    if usage is not None and usage > NOTIFY_QUEUE_WARN:
        size = f" of max_notify_queue_pages = {pages}" if pages else ""
        warnings.append(
            f"the NOTIFY queue is {usage:.0%} full{size}: a session that listens and never "
            "reads holds it; when it is full, every notifying commit fails"
        )
    return warnings, usage


def _read(conn: psycopg.Connection[Any], horizon_age: float = HORIZON_AGE) -> Health:
    server = conn.info.parameter_status("server_version")
    warnings, usage = _server_warnings(conn, horizon_age)
    row = conn.execute(TABLES_SQL).fetchone()
    has_messages, has_version, has_workers = row if row else (False, False, False)
    if not has_messages:
        return Health(
            True,
            None,
            server,
            None,
            SCHEMA_VERSION,
            warnings=tuple(warnings),
            notify_queue_usage=usage,
        )
    version_row = conn.execute(VERSION_SQL).fetchone() if has_version else None
    version = int(version_row[0]) if version_row else 1
    counts = COUNTS_SQL if version >= 4 else LEGACY_COUNTS_SQL  # leases, unfinished
    channels = [ChannelCounts(*r) for r in conn.execute(counts)]
    workers = (
        [WorkerInfo.from_row(r) for r in conn.execute(WORKERS_SQL, WORKERS_PARAMS)]
        if has_workers
        else []
    )
    paused: set[str] = set()
    if version >= 5:
        has_pause = conn.execute(HAS_PAUSE_SQL).fetchone()
        if has_pause and has_pause[0]:
            paused = {r[0] for r in conn.execute(PAUSED_SQL)}
    channels = [replace(c, paused=c.channel in paused) for c in channels]
    warnings += [f"worker {w.host}:{w.pid}: {x}" for w in workers if w.alive for x in w.warnings]
    known = {c.channel for c in channels}
    for name in sorted(({ch for w in workers if w.alive for ch in w.channels} | paused) - known):
        channels.append(ChannelCounts(name, 0, 0, 0, 0, None, paused=name in paused))
    return Health(
        True,
        None,
        server,
        version,
        SCHEMA_VERSION,
        tuple(channels),
        tuple(workers),
        tuple(warnings),
        usage,
    )


def age(seconds: float | None) -> str:
    """A duration as people read it: ``0.4s``, ``12m``, ``3.5h`` (``-`` for None)."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def since(moment: datetime.datetime) -> str:
    """How long ago ``moment`` was: ``3.2m ago``."""
    return age((datetime.datetime.now(datetime.timezone.utc) - moment).total_seconds()) + " ago"
