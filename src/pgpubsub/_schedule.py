"""Periodic durable channels: ``class Cleanup(Channel, lock_notifications=True, schedule=...)``.

``schedule`` is a cron expression read by croniter (``pgpubsub[schedule]``):
five fields, or six with seconds as the sixth (``"* * * * * */10"``: every 10
seconds; ``"*/10 * * * * *"`` is every second of every 10th minute), in the
channel's ``timezone`` (UTC by default).

Every worker that runs the channel keeps time, and at each tick tries to
advance the channel's row in ``pgpubsub.schedule`` to that tick; the one
whose update wins (a conditional upsert, so exactly one) stores the tick's
message in the same transaction. The message is then processed like any
durable message: once, retried, dead-lettered. A worker starting after ticks
were missed (no worker was running) stores the missed ones, at most
:data:`MAX_CATCH_UP` of the most recent, oldest first. The first worker ever
to run a channel starts from its next tick.

A channel field named ``scheduled_at`` (an aware datetime) receives the tick.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

import psycopg

from . import driver
from ._cron import croniter, zone
from .backoff import worth_logging
from .channel import ChannelSpec
from .durable import astore

__all__ = ["MAX_CATCH_UP", "Scheduler"]

log = logging.getLogger("pgpubsub.schedule")

#: Missed ticks replayed at most when a worker starts after an outage.
MAX_CATCH_UP = 10

# Wins the tick for this worker only if no one stored it (or a later one) yet.
TICK_SQL = (
    "INSERT INTO pgpubsub.schedule AS s (channel, last_tick) VALUES (%s, %s) "
    "ON CONFLICT (channel) DO UPDATE SET last_tick = EXCLUDED.last_tick "
    "WHERE s.last_tick < EXCLUDED.last_tick RETURNING s.last_tick"
)
LAST_SQL = "SELECT last_tick FROM pgpubsub.schedule WHERE channel = %s"


class Scheduler:
    """Stores one message per tick of ``spec``'s schedule, racing fairly with other workers."""

    def __init__(self, conninfo: str, spec: ChannelSpec):
        self.conninfo = conninfo
        self.spec = spec
        self.zone = zone(spec.cls.timezone, spec.path)
        self.croniter = croniter()

    def ticks_after(self, start: datetime.datetime, until: datetime.datetime) -> list[Any]:
        it = self.croniter(self.spec.cls.schedule, start.astimezone(self.zone))
        ticks = []
        while (tick := it.get_next(datetime.datetime)) <= until:
            ticks.append(tick)
            if len(ticks) > MAX_CATCH_UP:
                ticks.pop(0)
        return ticks

    def _lines(self, tick: datetime.datetime) -> str:
        fields = {"scheduled_at": tick} if "scheduled_at" in self.spec.fields else {}
        return self.spec.encode_lines([fields])[0]

    async def _store(self, conn: psycopg.AsyncConnection[Any], tick: datetime.datetime) -> bool:
        async with conn.transaction():
            cur = await conn.execute(TICK_SQL, (self.spec.name, tick))
            if await cur.fetchone() is None:
                return False  # another worker stored this tick
            await astore(conn, self.spec, self._lines(tick))
        return True

    async def run(self) -> None:
        await driver.keep_connected(self.conninfo, self._keep_time, self._trouble, 5.0)

    async def _keep_time(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self._catch_up(conn)
        while True:
            now = datetime.datetime.now(self.zone)
            tick = self.croniter(self.spec.cls.schedule, now).get_next(datetime.datetime)
            await asyncio.sleep(max(0.0, (tick - now).total_seconds()))
            await self._store(conn, tick)

    def _trouble(self, exc: Exception, failures: int) -> None:
        level = logging.WARNING if worth_logging(failures) else logging.DEBUG
        log.log(
            level, "schedule of %s: %s; trying again in 5s", self.spec.path, driver.one_line(exc)
        )

    async def _catch_up(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(LAST_SQL, (self.spec.name,))
        row = await cur.fetchone()
        if row is None:
            return  # never run: start from the next tick
        missed = self.ticks_after(row[0], datetime.datetime.now(self.zone))
        stored = [tick for tick in missed if await self._store(conn, tick)]
        if stored:
            log.info("schedule of %s: stored %d missed tick(s)", self.spec.path, len(stored))
