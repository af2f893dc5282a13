"""A worker's row in ``pgpubsub.worker``: written at start, refreshed, removed at stop.

Every ``every`` seconds the worker upserts its row (host, pid, version,
channels, processed and failed counts, ``last_seen``). ``pgpubsub status``
shows a row not refreshed for :data:`GONE_AFTER` seconds as a worker that is
gone; rows unseen for a day are deleted by the next worker that starts.

The registry is for operators: a worker runs the same without it. When the
table is missing (schema not migrated) or the role may not write it, a
warning says so (backing off like every outage warning) and the worker goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from . import driver
from ._version import version
from .backoff import worth_logging

__all__ = ["GONE_AFTER", "Heartbeat"]

log = logging.getLogger("pgpubsub.worker")

#: Seconds without a heartbeat after which a worker is shown as gone.
GONE_AFTER = 30.0

UPSERT_SQL = (
    "INSERT INTO pgpubsub.worker (id, host, pid, version, channels, processed, failed, stats) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
    "last_seen = pg_catalog.now(), processed = EXCLUDED.processed, failed = EXCLUDED.failed, "
    "stats = EXCLUDED.stats"
)
# A schema at version 2 (before `pgpubsub migrate`) has no stats column.
UPSERT_V2_SQL = (
    "INSERT INTO pgpubsub.worker (id, host, pid, version, channels, processed, failed) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
    "last_seen = pg_catalog.now(), processed = EXCLUDED.processed, failed = EXCLUDED.failed"
)
FORGET_SQL = (
    "DELETE FROM pgpubsub.worker WHERE id = %s "
    "OR last_seen < pg_catalog.now() - pg_catalog.make_interval(days => 1)"
)
REMOVE_SQL = "DELETE FROM pgpubsub.worker WHERE id = %s"


class Heartbeat:
    """Keeps this worker's row fresh while :meth:`run` runs."""

    def __init__(
        self,
        conninfo: str,
        stats: Callable[[], dict[str, dict[str, Any]]],
        every: float = 5.0,
    ):
        self.conninfo = conninfo
        self.stats = stats  # {channel: {"kind", "durable", "processed", "failed"}}
        self.every = every
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._first = True  # the first connection also deletes rows unseen for a day
        self._v2 = False  # the schema has no stats column yet

    def _row(self) -> tuple[object, ...]:
        stats = self.stats()
        processed = sum(int(c["processed"]) for c in stats.values())
        failed = sum(int(c["failed"]) for c in stats.values())
        host, pid, _ = self.id.rsplit(":", 2)
        row = (self.id, host, int(pid), version(), list(stats), processed, failed)
        return row if self._v2 else (*row, Jsonb(stats))

    async def run(self) -> None:
        await driver.keep_connected(self.conninfo, self._beat, self._trouble, self.every)

    async def _beat(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self._first:
            await conn.execute(FORGET_SQL, (self.id,))
            self._first = False
        while True:
            try:
                await conn.execute(UPSERT_V2_SQL if self._v2 else UPSERT_SQL, self._row())
            except psycopg.errors.UndefinedColumn:
                if self._v2:
                    raise
                log.info("worker registry: schema version 2, per-channel counts not shown")
                self._v2 = True
                continue
            await asyncio.sleep(self.every)

    def _trouble(self, exc: Exception, failures: int) -> None:
        text = driver.one_line(exc)
        state = driver.sqlstate(exc)
        if state in driver.SCHEMA_STATES:
            text = "pgpubsub.worker is missing: run `pgpubsub migrate` to show this worker"
        elif state == driver.PRIVILEGE_STATE:
            text = f"{text} (`pgpubsub grant ROLE --worker` lets this role register)"
        level = logging.WARNING if worth_logging(failures) else logging.DEBUG
        log.log(level, "worker registry: %s; `pgpubsub status` will not list this worker", text)

    async def remove(self, timeout: float = 2.0) -> None:
        """Delete this worker's row (a clean stop); a failure only leaves it to age out."""
        try:
            conn = await asyncio.wait_for(driver.connect_async(self.conninfo), timeout)
            async with conn:
                await asyncio.wait_for(conn.execute(REMOVE_SQL, (self.id,)), timeout)
        except Exception as exc:
            log.debug("worker registry: could not remove %s: %s", self.id, exc)
