"""Periodic durable channels: ``class Cleanup(Channel, lock_notifications=True, schedule=...)``.

``schedule`` is a cron expression read by croniter (``pgpubsub-engine[schedule]``):
five fields, or six with seconds as the sixth (``"* * * * * */10"``: every 10
seconds; ``"*/10 * * * * *"`` is every second of every 10th minute), in the
channel's ``timezone`` (UTC by default). When the clocks change, a wall-clock
time that does not exist runs at the first instant after the gap, and one that
occurs twice runs once, at its first occurrence, unless the minute or hour
field starts with ``*`` (hourly is every real hour): see :mod:`pgpubsub._cron`.

Every worker that runs the channel keeps time, and at each tick tries to
advance the channel's row in ``pgpubsub.schedule`` to that tick; the one
whose update wins (a conditional upsert, so exactly one) stores the tick's
message in the same transaction. A tick is stored at or after its instant,
never twice. The message is then processed like any durable message: once,
retried, dead-lettered. A worker starting after ticks were missed (no worker
was running) stores the missed ones, at most :data:`MAX_CATCH_UP` of the most
recent, oldest first (found walking back from now: the cost is those ticks,
not the ticks missed). The first worker ever to run a channel starts from its
next tick.

A channel field named ``scheduled_at`` (an aware datetime in the channel's
time zone) receives the tick.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

import psycopg

from . import driver
from ._cron import UTC, Cron, zone
from .backoff import worth_logging
from .channel import ChannelSpec
from .durable import astore

__all__ = ["MAX_CATCH_UP", "Clock", "Scheduler"]

log = logging.getLogger("pgpubsub.schedule")

#: Missed ticks replayed at most when a worker starts after an outage.
MAX_CATCH_UP = 10

# Wins the tick for this worker only if no one stored it (or a later one) yet.
# Never before the tick's instant by the database's clock either: a worker
# whose own clock runs ahead stores nothing early (and moves no one's last tick).
TICK_SQL = (
    "INSERT INTO pgpubsub.schedule AS s (channel, last_tick) "
    "SELECT %(channel)s, %(tick)s WHERE %(tick)s <= pg_catalog.clock_timestamp() "
    "ON CONFLICT (channel) DO UPDATE SET last_tick = EXCLUDED.last_tick "
    "WHERE s.last_tick < EXCLUDED.last_tick RETURNING s.last_tick"
)
# Seconds until the tick by the database's clock (<= 0: due).
EARLY_SQL = "SELECT pg_catalog.date_part('epoch', %s - pg_catalog.clock_timestamp())"
LAST_SQL = "SELECT last_tick FROM pgpubsub.schedule WHERE channel = %s"


class Clock:
    """The time and the sleeps of a scheduler (tests pass a simulated clock)."""

    def now(self) -> datetime.datetime:
        return datetime.datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Scheduler:
    """Stores one message per tick of ``spec``'s schedule, racing fairly with other workers."""

    def __init__(self, conninfo: str, spec: ChannelSpec, clock: Clock | None = None):
        self.conninfo = conninfo
        self.spec = spec
        self.zone = zone(spec.cls.timezone, spec.path)
        self.cron = Cron(spec.cls.schedule or "", self.zone)
        self.clock = clock or Clock()
        #: Why it cannot store ticks now (a database error it retries), or None.
        self.failing: str | None = None

    def _lines(self, tick: datetime.datetime) -> str:
        wall = tick.astimezone(self.zone)
        fields = {"scheduled_at": wall} if "scheduled_at" in self.spec.fields else {}
        return self.spec.encode_lines([fields])[0]

    async def _store(self, conn: psycopg.AsyncConnection[Any], tick: datetime.datetime) -> bool:
        while True:
            async with conn.transaction():
                cur = await conn.execute(TICK_SQL, {"channel": self.spec.name, "tick": tick})
                if await cur.fetchone() is not None:
                    await astore(conn, self.spec, self._lines(tick))
                    self.failing = None
                    return True
            # Another worker stored this tick, or it is early by the database's clock.
            row = await (await conn.execute(EARLY_SQL, (tick,))).fetchone()
            early = float(row[0]) if row is not None and row[0] is not None else 0.0
            if early <= 0:
                return False
            await self.clock.sleep(early)

    async def run(self) -> None:
        await driver.keep_connected(self.conninfo, self._keep_time, self._trouble, 5.0)

    async def _keep_time(self, conn: psycopg.AsyncConnection[Any]) -> None:
        last = await self._catch_up(conn)
        while True:
            # The tick after the last one seen: never one tick twice, and none
            # skipped when storing one took long (a lock, a slow commit, a
            # stalled loop). Behind by more than MAX_CATCH_UP: catch up as at start.
            now = self.clock.now()
            tick = self.cron.next_after(last if last is not None else now)
            if last is not None and tick <= now:
                for missed in self.cron.latest(last, now, MAX_CATCH_UP):
                    await self._store(conn, missed)
                    last = missed
                continue
            await self._sleep_until(tick)
            await self._store(conn, tick)
            last = tick

    async def _sleep_until(self, tick: datetime.datetime) -> None:
        """Return at or after the instant ``tick`` (durations in UTC instants)."""
        while (left := (tick - self.clock.now()).total_seconds()) > 0:
            await self.clock.sleep(left)

    def _trouble(self, exc: Exception, failures: int) -> None:
        # Shown by the worker's status (and so `pgpubsub status`) until a tick is stored.
        self.failing = f"schedule of {self.spec.path} failing: {driver.one_line(exc)}"
        level = logging.WARNING if worth_logging(failures) else logging.DEBUG
        log.log(
            level, "schedule of %s: %s; trying again in 5s", self.spec.path, driver.one_line(exc)
        )

    async def _catch_up(self, conn: psycopg.AsyncConnection[Any]) -> datetime.datetime | None:
        """Store the missed ticks (at most MAX_CATCH_UP); the last tick stored by anyone."""
        cur = await conn.execute(LAST_SQL, (self.spec.name,))
        row = await cur.fetchone()
        if row is None:
            return None  # never run: start from the next tick
        last: datetime.datetime = row[0]
        # A walk back of MAX_CATCH_UP ticks, a few croniter steps each (well under a
        # millisecond); in a thread all the same, so the loop never waits on croniter.
        missed = await asyncio.to_thread(self.cron.latest, last, self.clock.now(), MAX_CATCH_UP)
        stored = [tick for tick in missed if await self._store(conn, tick)]
        if stored:
            log.info("schedule of %s: stored %d missed tick(s)", self.spec.path, len(stored))
        return max([last, *missed])
