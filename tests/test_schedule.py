"""Schedules across clock changes, catch-up cost, declaration checks and scheduler failures.

The DST cases run the scheduler's own loop on a simulated clock (its ``now``
is injected and its sleeps advance it) against a real database, and read what
it stored: the messages and ``pgpubsub.schedule``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import admin_query, wait_until

import pgpubsub
from pgpubsub._loopthread import LoopThread
from pgpubsub._schedule import MAX_CATCH_UP, Scheduler
from pgpubsub.channel import Channel, spec_of
from pgpubsub.durable import migrate
from pgpubsub.errors import ConfigurationError
from pgpubsub.listen import Registry
from pgpubsub.worker import Worker

UTC = datetime.timezone.utc


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    migrate(dsn)
    yield dsn


def at(text: str) -> datetime.datetime:
    """A UTC instant: ``"2026-10-25 01:00"``."""
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


class Finished(Exception):
    """The simulated clock reached its end: stops the scheduler's loop."""


class SimulatedClock:
    """``now`` is simulated; a sleep advances it at once and is recorded."""

    def __init__(self, start: datetime.datetime, end: datetime.datetime):
        self.now_ = start
        self.end = end
        self.sleeps: list[float] = []

    def now(self) -> datetime.datetime:
        return self.now_

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if len(self.sleeps) > 1000:
            raise AssertionError(f"the scheduler spins: sleeps {self.sleeps[-5:]}")
        self.now_ += datetime.timedelta(seconds=seconds)
        if self.now_ > self.end:
            raise Finished


def scheduled(expression: str, timezone: str) -> Any:
    @dataclass
    class Job(Channel, name="job", lock_notifications=True, schedule=expression, timezone=timezone):
        scheduled_at: datetime.datetime | None = None

    return Job


class Recording(Scheduler):
    """The scheduler, noting the simulated time of each store."""

    stores: list[tuple[datetime.datetime, datetime.datetime]]

    async def _store(self, conn: Any, tick: datetime.datetime) -> bool:
        self.stores.append((self.clock.now(), tick))
        return await super()._store(conn, tick)


def run_simulated(
    db: str, cls: Any, start: datetime.datetime, end: datetime.datetime, last: Any = None
) -> tuple[list[datetime.datetime], SimulatedClock, Recording]:
    """Run the scheduler of ``cls`` from ``start`` to ``end`` on a simulated clock; the ticks
    stored (the messages' ``scheduled_at``), in UTC, in storing order."""
    if last is not None:
        admin_query(db, "INSERT INTO pgpubsub.schedule VALUES ('job', %s)", (last,))
    clock = SimulatedClock(start, end)
    scheduler = Recording(db, spec_of(cls), clock=clock)
    scheduler.stores = []

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            with pytest.raises(Finished):
                await scheduler._keep_time(conn)

    asyncio.run(main())
    rows = admin_query(db, "SELECT payload FROM pgpubsub.message WHERE channel = 'job' ORDER BY id")
    ticks = [
        datetime.datetime.fromisoformat(json.loads(str(p))["scheduled_at"]).astimezone(UTC)
        for (p,) in rows
    ]
    assert admin_query(db, "SELECT last_tick FROM pgpubsub.schedule") == [(ticks[-1],)]
    return ticks, clock, scheduler


DST_CASES = [
    # Europe/Berlin, autumn (2026-10-25 03:00 CEST -> 02:00 CET at 01:00 UTC): every real
    # hour; the daily 02:30 once, at its first occurrence (CEST).
    (
        "0 * * * *",
        "Europe/Berlin",
        "2026-10-24 22:30",
        "2026-10-25 04:30",
        ["2026-10-24 23:00", "2026-10-25 00:00", "2026-10-25 01:00", "2026-10-25 02:00"]
        + ["2026-10-25 03:00", "2026-10-25 04:00"],
    ),
    (
        "30 2 * * *",
        "Europe/Berlin",
        "2026-10-23 12:00",
        "2026-10-27 12:00",
        ["2026-10-24 00:30", "2026-10-25 00:30", "2026-10-26 01:30", "2026-10-27 01:30"],
    ),
    # Spring (2026-03-29 02:00 CET -> 03:00 CEST at 01:00 UTC): the missing 02:30 runs at
    # 03:00 CEST, the first instant after the gap.
    (
        "0 * * * *",
        "Europe/Berlin",
        "2026-03-28 22:30",
        "2026-03-29 03:30",
        ["2026-03-28 23:00", "2026-03-29 00:00", "2026-03-29 01:00", "2026-03-29 02:00"]
        + ["2026-03-29 03:00"],
    ),
    (
        "30 2 * * *",
        "Europe/Berlin",
        "2026-03-27 12:00",
        "2026-03-30 12:00",
        ["2026-03-28 01:30", "2026-03-29 01:00", "2026-03-30 00:30"],
    ),
    # America/New_York, autumn (2026-11-01 02:00 EDT -> 01:00 EST at 06:00 UTC) and spring
    # (2026-03-08 02:00 EST -> 03:00 EDT at 07:00 UTC).
    (
        "30 1 * * *",
        "America/New_York",
        "2026-10-30 12:00",
        "2026-11-02 12:00",
        ["2026-10-31 05:30", "2026-11-01 05:30", "2026-11-02 06:30"],
    ),
    (
        "0 * * * *",
        "America/New_York",
        "2026-11-01 03:30",
        "2026-11-01 08:30",
        ["2026-11-01 04:00", "2026-11-01 05:00", "2026-11-01 06:00", "2026-11-01 07:00"]
        + ["2026-11-01 08:00"],
    ),
    (
        "30 2 * * *",
        "America/New_York",
        "2026-03-06 12:00",
        "2026-03-09 12:00",
        ["2026-03-07 07:30", "2026-03-08 07:00", "2026-03-09 06:30"],
    ),
]


@pytest.mark.parametrize(("expression", "timezone", "start", "end", "expected"), DST_CASES)
def test_a_clock_change_stores_each_tick_once_at_its_instant_without_spinning(
    db: str, expression: str, timezone: str, start: str, end: str, expected: list[str]
) -> None:
    ticks, clock, scheduler = run_simulated(db, scheduled(expression, timezone), at(start), at(end))
    assert ticks == [at(t) for t in expected]
    for now, tick in scheduler.stores:
        assert now >= tick  # never stored before its instant
    # One sleep per tick (plus the last, past the end), each up to the tick: no spinning.
    assert len(clock.sleeps) == len(expected) + 1
    assert min(clock.sleeps) > 0


def test_a_worker_starting_in_a_repeated_hour_catches_up_without_storing_early(db: str) -> None:
    # Stored up to 02:00 CEST; the worker starts at 02:30 CET, in the repeated hour: the
    # missed 02:00 CET (01:00 UTC) is stored, 03:00 CET waits for its instant.
    cls = scheduled("0 * * * *", "Europe/Berlin")
    ticks, clock, scheduler = run_simulated(
        db, cls, at("2026-10-25 01:30"), at("2026-10-25 02:10"), last=at("2026-10-25 00:00")
    )
    assert ticks == [at("2026-10-25 01:00"), at("2026-10-25 02:00")]
    assert all(now >= tick for now, tick in scheduler.stores)
    assert clock.sleeps == [30 * 60, 60 * 60]


def ticks_by_brute_force(
    expression: str, tz: zoneinfo.ZoneInfo, start: datetime.datetime, end: datetime.datetime
) -> list[datetime.datetime]:
    """The documented meaning, minute by minute: every instant whose wall time matches
    (a repeated time only at its first occurrence unless the minute or hour field is
    ``*``...), and the end of a gap when a skipped wall time matches."""
    from croniter import croniter

    real_time = any(f.startswith("*") for f in expression.split()[:2])
    minute = datetime.timedelta(minutes=1)
    out = []
    u = start + minute
    while u <= end:
        local, before = u.astimezone(tz), (u - minute).astimezone(tz)
        wall, prev = local.replace(tzinfo=None), before.replace(tzinfo=None)
        matches = croniter.match(expression, wall) and (real_time or local.fold == 0)
        skipped = prev + minute
        while not matches and skipped < wall:  # wall times the clocks jumped over
            matches = croniter.match(expression, skipped)
            skipped += minute
        if matches:
            out.append(u)
        u += minute
    return out


@pytest.mark.parametrize(
    ("timezone", "change"),
    [
        ("Europe/Berlin", "2026-03-29 01:00"),
        ("Europe/Berlin", "2026-10-25 01:00"),
        ("America/New_York", "2026-03-08 07:00"),
        ("America/New_York", "2026-11-01 06:00"),
        ("Australia/Lord_Howe", "2026-04-04 15:00"),  # half an hour back
        ("Australia/Lord_Howe", "2026-10-03 15:30"),  # half an hour forward
        ("Australia/Sydney", "2026-04-04 16:00"),
    ],
)
def test_ticks_forward_and_backward_match_the_documented_meaning(
    timezone: str, change: str
) -> None:
    from pgpubsub._cron import Cron

    tz = zoneinfo.ZoneInfo(timezone)
    start = at(change) - datetime.timedelta(hours=6)
    end = at(change) + datetime.timedelta(hours=6)
    assert start.astimezone(tz).utcoffset() != end.astimezone(tz).utcoffset()  # a change
    for expression in ["0 * * * *", "30 2 * * *", "*/20 * * * *", "15,45 1-3 * * *", "*/7 2 * * *"]:
        cron = Cron(expression, tz)
        expected = ticks_by_brute_force(expression, tz, start, end)
        forward, t = [], start
        while (t := cron.next_after(t)) <= end:
            forward.append(t)
        assert forward == expected, expression
        for count in (1, 3, 1000):
            assert cron.latest(start, end, count) == expected[-count:], (expression, count)


def test_catch_up_after_a_year_costs_the_ticks_it_stores_and_never_stalls_the_loop(
    db: str,
) -> None:
    cls = scheduled("* * * * *", "Europe/Berlin")
    now = at("2026-11-30 11:00:30")
    admin_query(
        db,
        "INSERT INTO pgpubsub.schedule VALUES ('job', %s)",
        (now - datetime.timedelta(days=365),),
    )
    scheduler = Scheduler(db, spec_of(cls), clock=SimulatedClock(now, now))
    gaps: list[float] = []

    async def main() -> float:
        stop = asyncio.Event()

        async def beat() -> None:  # what LISTEN, heartbeats and listeners need: turns
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                gaps.append(time.perf_counter() - last)
                last = time.perf_counter()

        beating = asyncio.create_task(beat())
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            started = time.perf_counter()
            await scheduler._catch_up(conn)
            took = time.perf_counter() - started
        stop.set()
        await beating
        return took

    took = asyncio.run(main())
    assert took < 0.5, took
    assert max(gaps) < 0.2, max(gaps)
    rows = admin_query(db, "SELECT payload FROM pgpubsub.message ORDER BY id")
    stored = [datetime.datetime.fromisoformat(json.loads(str(p))["scheduled_at"]) for (p,) in rows]
    minute = datetime.timedelta(minutes=1)
    assert stored == [at("2026-11-30 11:00") - minute * i for i in reversed(range(MAX_CATCH_UP))]
    assert admin_query(db, "SELECT last_tick FROM pgpubsub.schedule") == [(at("2026-11-30 11:00"),)]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"schedule": "0 0 31 2 *"}, "schedule '0 0 31 2 *' never matches a date"),
        ({"schedule": "0 0 30 2 *"}, "schedule '0 0 30 2 *' never matches"),
        ({"schedule": "garbage"}, "schedule 'garbage' is not a cron expression"),
        ({"schedule": "* * * *"}, "schedule '* * * *' is not a cron expression"),
        ({"schedule": "* * * * * 0 2030"}, "schedule '* * * * * 0 2030' has 7 fields"),
        ({"schedule": 5}, "schedule 5 is not a cron expression"),
        ({"schedule": "* * * * *", "timezone": "Europe"}, "unknown timezone 'Europe'"),
        ({"schedule": "* * * * *", "timezone": "Nope/Nowhere"}, "unknown timezone 'Nope/Nowhere'"),
        ({"schedule": "* * * * *", "timezone": ""}, "unknown timezone ''"),
        ({"schedule": "* * * * *", "timezone": "../etc"}, "unknown timezone '../etc'"),
        ({"schedule": "* * * * *", "timezone": None}, "unknown timezone None"),
    ],
)
def test_an_impossible_schedule_or_zone_is_refused_at_declaration(
    options: dict[str, Any], says: str
) -> None:
    cls = dataclass(
        type("Bad", (Channel,), {"__annotations__": {}}, lock_notifications=True, **options)
    )
    with pytest.raises(ConfigurationError, match=re_escape(says)) as caught:
        spec_of(cls)
    assert "Bad" in str(caught.value)  # names the channel


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgpubsub", *args], capture_output=True, text=True, timeout=60
    )


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_a_failed_scheduler_is_logged_shown_and_stop_still_drains(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    @dataclass
    class Broken(Channel, name="broken_job", lock_notifications=True, schedule="* * * * *"):
        scheduled_at: datetime.datetime | None = None

    spec = spec_of(Broken)
    Broken.schedule = "0 0 31 2 *"  # after the declaration's check: the scheduler fails
    started, handled = threading.Event(), []
    registry = Registry()

    def handle() -> None:
        started.set()
        time.sleep(0.3)  # in hand when stop() begins
        handled.append(1)

    registry.add(Broken, handle)
    caplog.set_level(logging.ERROR, "pgpubsub")
    worker = Worker(db, registry=registry, channels=[spec])
    assert worker.heartbeat is not None
    worker.heartbeat.every = 0.1  # the registry row shows the failure soon
    loop = LoopThread("test-worker")
    loop.run(worker.start(), timeout=10)
    try:
        wait_until(lambda: not worker.status().healthy, timeout=10)
        assert "schedule of" in caplog.text and "failed to find next date" in caplog.text
        assert worker.status().failures == (
            f"schedule of {spec.path} stopped: failed to find next date",
        )
        wait_until(lambda: pgpubsub.status(db).problems(), timeout=10)
        health = pgpubsub.status(db)
        assert any("failed to find next date" in p for p in health.problems()), health
        shown = cli("status", "--dsn", db)
        assert shown.returncode == 0 and "FAILED" in shown.stdout, shown
        assert "schedule of" in shown.stdout and "failed to find next date" in shown.stdout
        probe = cli("status", "--check", "--dsn", db)
        assert probe.returncode == 1 and "failed to find next date" in probe.stderr, probe
        # The worker goes on: its durable channel is still processed.
        with psycopg.connect(db, autocommit=True) as conn:
            pgpubsub.notify(Broken(), conn=conn)
        assert started.wait(10)
    finally:
        loop.run(worker.stop(), timeout=15)  # no exception: drains, removes the registry row
        loop.close()
    assert handled == [1]  # the message in hand was finished, and committed
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message") == [(0,)]
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.worker") == [(0,)]
    assert worker.engine.status().state == "stopped"


def test_every_second_is_every_real_second_across_clock_changes_and_cheap() -> None:
    from pgpubsub._cron import Cron

    cron = Cron("* * * * * *", zoneinfo.ZoneInfo("Europe/Berlin"))
    second = datetime.timedelta(seconds=1)
    # Around the spring gap, and both ends of the autumn's repeated hour.
    for around in ("2026-03-29 01:00", "2026-10-25 01:00", "2026-10-25 02:00"):
        t = at(around) - 300 * second
        for _ in range(600):
            t, before = cron.next_after(t), t
            assert t - before == second, before
        assert cron.latest(at(around) - 300 * second, t, 10) == [
            t - i * second for i in range(9, -1, -1)
        ]
    # In the repeated hour, the next tick is a few croniter steps, not a walk of the hour.
    for inside in ("2026-10-25 00:30", "2026-10-25 01:30"):  # first and second occurrence
        started = time.perf_counter()
        for _ in range(100):
            assert cron.next_after(at(inside)) == at(inside) + second
        assert (time.perf_counter() - started) / 100 < 0.005
        started = time.perf_counter()  # and so is the catch-up's walk back
        ticks = cron.latest(at(inside) - datetime.timedelta(days=1), at(inside), MAX_CATCH_UP)
        assert ticks == [at(inside) - i * second for i in range(MAX_CATCH_UP - 1, -1, -1)]
        assert time.perf_counter() - started < 0.05


def test_sigterm_after_a_scheduler_failure_drains_and_deregisters(db: str) -> None:
    python_path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpubsub", "listen", "app.failing_schedule"],
        env={**os.environ, "PGPUBSUB_DSN": db, "PYTHONPATH": python_path},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(
            lambda: any("failed to find next date" in p for p in pgpubsub.status(db).problems()),
            timeout=30,
            interval=0.2,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "schedule of app.failing_schedule.Failing stopped: failed to find next date" in out
    assert "Traceback" in out  # logged with its traceback, when it happened
    assert "worker stopped" in out, out  # stop() ran to its end
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.worker") == [(0,)]
