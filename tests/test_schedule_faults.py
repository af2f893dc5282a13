"""Schedules under the faults the hostile review found (each failed on the code it tried).

A store that takes longer than a tick (a lock), a worker whose clock runs
ahead of the database's, a scheduler that keeps failing, and schedules and
zones that cannot mean one instant on every worker.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from helpers import Running, admin_query, wait_until

from pgpubsub._schedule import Clock, Scheduler
from pgpubsub.channel import Channel, spec_of
from pgpubsub.durable import migrate
from pgpubsub.errors import ConfigurationError
from pgpubsub.listen import Registry

UTC = datetime.timezone.utc


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    migrate(dsn)
    yield dsn


@dataclass
class EverySecond(Channel, lock_notifications=True, schedule="* * * * * *"):
    scheduled_at: datetime.datetime | None = None


def ticks(dsn: str) -> list[datetime.datetime]:
    rows = admin_query(
        dsn, "SELECT (payload::jsonb ->> 'scheduled_at')::timestamptz FROM pgpubsub.message"
    )
    return sorted(r[0] for r in rows)  # type: ignore[misc]


def run_for(scheduler: Scheduler, seconds: float) -> None:
    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(main())


# Timing of the library's own threads (no SQL of the server's version): PostgreSQL 18 only in CI.
@pytest.mark.acceptance
def test_a_store_that_takes_longer_than_a_tick_skips_no_tick(db: str) -> None:
    scheduler = Scheduler(db, spec_of(EverySecond))
    holder = threading.Thread(
        target=lambda: admin_query(
            db,
            "BEGIN; SELECT pg_sleep(1.5); LOCK pgpubsub.schedule; SELECT pg_sleep(4); COMMIT",
        )
    )
    holder.start()
    run_for(scheduler, 9)
    holder.join()
    seen = ticks(db)
    gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    assert len(seen) >= 6 and max(gaps) == datetime.timedelta(seconds=1), seen


class Ahead(Clock):
    def now(self) -> datetime.datetime:
        return super().now() + datetime.timedelta(seconds=5)


# Timing of the library's own threads (no SQL of the server's version): PostgreSQL 18 only in CI.
@pytest.mark.acceptance
def test_a_worker_whose_clock_runs_ahead_stores_no_tick_early(db: str) -> None:
    scheduler = Scheduler(db, spec_of(EverySecond), clock=Ahead())
    run_for(scheduler, 9)
    rows = admin_query(
        db,
        "SELECT (payload::jsonb ->> 'scheduled_at')::timestamptz - created_at "
        "FROM pgpubsub.message",
    )
    assert rows, "no tick stored"
    early = [r[0] for r in rows if r[0] > datetime.timedelta(seconds=0)]  # type: ignore[operator]
    assert not early, early


def test_a_scheduler_that_keeps_failing_shows_in_the_workers_status(db: str) -> None:
    admin_query(db, "DROP TABLE pgpubsub.schedule")  # every store fails
    registry = Registry()
    registry.add(EverySecond, lambda scheduled_at: None)
    worker = Running(db, registry, channels=[spec_of(EverySecond)])
    try:
        wait_until(lambda: not worker.worker.status().healthy, timeout=20)
        assert any("schedule of" in f for f in worker.worker.status().failures)
    finally:
        worker.stop()


@pytest.mark.parametrize(
    "options",
    [
        {"schedule": "R * * * *"},
        {"schedule": "0 R * * *"},
        {"schedule": "* * * * *", "timezone": "localtime"},
        {"schedule": "* * * * *", "timezone": "Factory"},
        {"schedule": "* * * * *", "timezone": "right/UTC"},
        {"schedule": "* * * * *", "timezone": "posixrules"},
    ],
)
def test_schedules_and_zones_that_mean_no_single_instant_are_refused(
    options: dict[str, str],
) -> None:
    with pytest.raises(ConfigurationError):

        @dataclass
        class Bad(Channel, lock_notifications=True, **options):  # type: ignore[call-arg]
            pass

        spec_of(Bad)


def test_hourly_and_daily_aliases_are_still_accepted() -> None:
    for schedule in ("@hourly", "@daily", "@yearly"):

        @dataclass
        class Fine(Channel, lock_notifications=True, schedule=schedule):  # type: ignore[call-arg]
            pass

        assert spec_of(Fine).cls.schedule == schedule
