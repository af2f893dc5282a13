"""What ``pgpubsub status`` shows: :func:`status` and the :class:`Health` it returns.

::

    health = pgpubsub.status(dsn)
    health.problems(max_age=300)   # [] when the database is reachable, the schema
                                   # current and no due message waited over 300 s

``status`` never raises for the conditions it reports: an unreachable
database or a missing schema is in the result (``reachable``, ``schema_version``).
Counts are exact (one aggregate over ``pgpubsub.message``).
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from . import driver
from ._heartbeat import GONE_AFTER

__all__ = ["SCHEMA_VERSION", "ChannelCounts", "Health", "WorkerInfo", "age", "since", "status"]

#: The schema version this library installs and expects (``pgpubsub.version``).
SCHEMA_VERSION = 4

COUNTS_SQL = """
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
TIMEOUT_SQL = "SELECT pg_catalog.set_config('statement_timeout', %s, false)"
# to_regclass: NULL instead of an error when the table is not there.
TABLES_SQL = (
    "SELECT pg_catalog.to_regclass('pgpubsub.message') IS NOT NULL, "
    "pg_catalog.to_regclass('pgpubsub.version') IS NOT NULL, "
    "pg_catalog.to_regclass('pgpubsub.worker') IS NOT NULL"
)


@dataclass(frozen=True)
class ChannelCounts:
    channel: str
    pending: int  # waiting, due or not (retries and delayed messages included)
    due: int  # pending and due now
    dead: int
    done: int  # kept for the channel's retention
    oldest_due_age: float | None  # seconds the oldest due message has waited; None: none due


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

    @property
    def schema_current(self) -> bool:
        return self.schema_version is not None and self.schema_version >= self.expected_version

    def problems(self, max_age: float | None = None) -> list[str]:
        """What makes this unhealthy (empty when healthy); ``max_age``: seconds a due message
        may wait. A live worker whose background task (a scheduler) stopped is a problem."""
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
        return stopped + [
            f"{c.channel}: the oldest due message has waited {c.oldest_due_age:.0f}s "
            f"(more than {max_age:g}s)"
            for c in self.channels
            if c.oldest_due_age is not None and c.oldest_due_age > max_age
        ]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema_current"] = self.schema_current
        return data


def status(dsn: str = "", *, timeout: float = 5.0) -> Health:
    """Database, schema, per-channel counts and live workers (``pgpubsub status``)."""
    conninfo = driver.build_conninfo(dsn)
    try:
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=max(1, int(timeout)))
    except psycopg.Error as exc:
        return Health(False, driver.one_line(exc), None, None, SCHEMA_VERSION)
    with conn:
        try:
            conn.execute(TIMEOUT_SQL, (str(int(timeout * 1000)),))
            return _read(conn)
        except psycopg.Error as exc:
            raise driver.translate(exc, "reading the status") from exc


def _read(conn: psycopg.Connection[Any]) -> Health:
    server = conn.info.parameter_status("server_version")
    row = conn.execute(TABLES_SQL).fetchone()
    has_messages, has_version, has_workers = row if row else (False, False, False)
    if not has_messages:
        return Health(True, None, server, None, SCHEMA_VERSION)
    version_row = conn.execute(VERSION_SQL).fetchone() if has_version else None
    version = int(version_row[0]) if version_row else 1
    channels = [ChannelCounts(*r) for r in conn.execute(COUNTS_SQL)]
    workers = (
        [WorkerInfo.from_row(r) for r in conn.execute(WORKERS_SQL, WORKERS_PARAMS)]
        if has_workers
        else []
    )
    known = {c.channel for c in channels}
    for name in sorted({ch for w in workers if w.alive for ch in w.channels} - known):
        channels.append(ChannelCounts(name, 0, 0, 0, 0, None))
    return Health(True, None, server, version, SCHEMA_VERSION, tuple(channels), tuple(workers))


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
