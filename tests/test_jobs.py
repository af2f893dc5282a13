"""Durable channels as a job queue: delays, dedupe, ordering keys, priorities, cancel,
concurrency, a global in-flight limit and schedules, with real worker processes where it
matters."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from helpers import Running, admin_query, wait_until

import pgpubsub
from pgpubsub import messages
from pgpubsub.channel import Channel
from pgpubsub.durable import connection, migrate
from pgpubsub.errors import ConfigurationError
from pgpubsub.listen import Registry

TESTS = Path(__file__).parent
UTC = datetime.timezone.utc


@dataclass
class Reminder(Channel, name="reminders", lock_notifications=True, retry_delay=0.05):
    user_id: int
    # A field named like a publishing option stays a field in the keyword form.
    priority: int = 0


@dataclass
class Plain(Channel, name="plain_reminders"):
    user_id: int


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    migrate(dsn)
    yield dsn


def listen(dsn: str, channel: str, processes: int, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgpubsub",
            "listen",
            "app.jobs",
            "--processes",
            str(processes),
            "--channels",
            f"app.jobs.{channel}",
        ],
        env={**os.environ, "PGPUBSUB_DSN": dsn, "PYTHONPATH": str(TESTS), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    return out


def test_options_go_with_an_instance_and_are_checked(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        # The keyword form: `priority` is the field.
        mid = pgpubsub.notify(Reminder, conn=conn, user_id=1, priority=7)
        assert admin_query(db, "SELECT priority, payload FROM pgpubsub.message") == [
            (0, '{"user_id":1,"priority":7}')
        ]
        for bad, says in [
            ({"delay": -1}, "delay must be seconds from 0"),
            ({"delay": 1e300}, "delay must be seconds from 0"),
            ({"delay": float("nan")}, "delay must be seconds from 0"),
            ({"run_at": datetime.datetime(2030, 1, 1)}, "aware datetime"),
            ({"delay": 1, "run_at": datetime.datetime.now(UTC)}, "not both"),
            ({"priority": "high"}, "priority must be an int"),
            ({"dedupe_key": ""}, "dedupe_key must be a non-empty str"),
            ({"ordering_key": "é" * 600}, "ordering_key is over 1024 bytes"),
            ({"dedupe_key": "a\udc80"}, "dedupe_key is not valid Unicode text"),
            ({"priority": 2**31}, "out of range"),
            ({"retries": 3}, "unknown publishing option(s) ['retries']"),
        ]:
            with pytest.raises(ConfigurationError, match=re_escape(says)):
                pgpubsub.notify(Reminder(user_id=2), conn=conn, **bad)
        with pytest.raises(ConfigurationError, match="plain channel"):
            pgpubsub.notify(Plain(user_id=1), conn=conn, delay=5)
        assert admin_query(db, "SELECT id FROM pgpubsub.message") == [(mid,)]


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_delayed_messages_run_on_time_not_before(db: str) -> None:
    ran: dict[int, float] = {}
    registry = Registry()
    registry.add(Reminder, lambda user_id: ran.setdefault(user_id, time.time()))
    worker = Running(db, registry)
    try:
        with psycopg.connect(db, autocommit=True) as conn:
            now = time.time()
            pgpubsub.notify(Reminder(user_id=1), conn=conn, delay=1.5)
            pgpubsub.notify(
                Reminder(user_id=2),
                conn=conn,
                run_at=datetime.datetime.fromtimestamp(now + 0.8, UTC),
            )
            pgpubsub.notify(Reminder(user_id=3), conn=conn, delay=datetime.timedelta(seconds=2.2))
        time.sleep(0.5)
        assert ran == {}
        wait_until(lambda: len(ran) == 3, timeout=10)
    finally:
        worker.stop()
    for user_id, due in ((1, now + 1.5), (2, now + 0.8), (3, now + 2.2)):
        assert due <= ran[user_id] + 0.01, (user_id, ran[user_id] - due)
        assert ran[user_id] - due < 0.1, (user_id, ran[user_id] - due)


def test_eight_racing_publishers_on_one_dedupe_key_store_one_message(db: str) -> None:
    barrier = threading.Barrier(8)
    ids: list[int] = []

    def publish() -> None:
        with psycopg.connect(db) as conn:
            barrier.wait()
            ids.append(pgpubsub.notify(Reminder(user_id=1), conn=conn, dedupe_key="user-1"))
            conn.commit()

    threads = [threading.Thread(target=publish) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message") == [(1,)]
    assert len(set(ids)) == 1
    # Once processed, the key is free again.
    registry = Registry()
    registry.add(Reminder, lambda user_id: None)
    assert pgpubsub.process_stored_notifications([Reminder], dsn=db, registry=registry) == 1
    with psycopg.connect(db, autocommit=True) as conn:
        again = pgpubsub.notify(Reminder(user_id=1), conn=conn, dedupe_key="user-1")
        assert again != ids[0]
        assert pgpubsub.notify_many(Reminder, [{"user_id": 2}], conn=conn, dedupe_key="user-1") == 1
    assert admin_query(db, "SELECT id FROM pgpubsub.message") == [(again,)]


def test_higher_priority_first_among_due_messages(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify_many(Reminder, [{"user_id": i} for i in range(3)], conn=conn)
        pgpubsub.notify_many(Reminder, [{"user_id": 10}], conn=conn, priority=10)
        pgpubsub.notify(Reminder(user_id=5), conn=conn, priority=5)
        pgpubsub.notify(Reminder(user_id=99), conn=conn, priority=99, delay=60)  # not due
    order: list[int] = []
    registry = Registry()
    registry.add(Reminder, lambda user_id: order.append(user_id))
    assert pgpubsub.process_stored_notifications([Reminder], dsn=db, registry=registry) == 5
    assert order == [10, 5, 0, 1, 2]


def test_cancel_pending_messages_api_and_cli(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        a = pgpubsub.notify(Reminder(user_id=1), conn=conn, delay=60)
        b = pgpubsub.notify(Reminder(user_id=2), conn=conn, delay=60)
        c = pgpubsub.notify(Reminder(user_id=3), conn=conn)
        admin_query(db, "UPDATE pgpubsub.message SET status = 'dead' WHERE id = %s", (c,))
        assert messages.cancel(conn, ids=[a, c]) == 1  # the dead one is not pending
        with pytest.raises(ConfigurationError, match="ids, a channel"):
            messages.cancel(conn)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgpubsub",
            "messages",
            "cancel",
            "--channel",
            "reminders",
            "--dsn",
            db,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 2 and "--yes" in out.stderr  # a whole channel needs --yes
    out = subprocess.run(
        [sys.executable, "-m", "pgpubsub", "messages", "cancel", str(b), "--dsn", db],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout == "cancelled 1 message(s)\n"
    assert admin_query(db, "SELECT id, status FROM pgpubsub.message") == [(c, "dead")]
    registry = Registry()
    registry.add(Reminder, lambda user_id: pytest.fail("a cancelled message ran"))
    admin_query(db, "DELETE FROM pgpubsub.message")
    assert pgpubsub.process_stored_notifications([Reminder], dsn=db, registry=registry) == 0


def test_a_failing_message_holds_back_its_key_until_it_succeeds_or_is_dead(db: str) -> None:
    @dataclass
    class Steps(Channel, name="steps", lock_notifications=True, max_attempts=3, retry_delay=0.05):
        key: str
        step: int

    attempts: dict[tuple[str, int], int] = {}

    def run(key: str, step: int) -> None:
        attempts[(key, step)] = attempts.get((key, step), 0) + 1
        if (key, step) == ("a", 1) and attempts[(key, step)] < 3:
            raise RuntimeError("not yet")  # succeeds at its third attempt
        if (key, step) == ("b", 1):
            raise RuntimeError("never")  # ends dead
        # In the message's transaction: recorded once per completed message. (A list in
        # memory would not be: a batch with a failure is run again, one message at a time.)
        connection().execute(
            "INSERT INTO steps_done VALUES (%s, %s, nextval('steps_order'))", (key, step)
        )

    admin_query(db, "CREATE TABLE steps_done (key text, step int, at bigint)")
    admin_query(db, "CREATE SEQUENCE steps_order")
    registry = Registry()
    registry.add(Steps, run)
    with psycopg.connect(db, autocommit=True) as conn:
        for step in range(3):
            for key in ("a", "b", "c"):
                pgpubsub.notify(Steps(key=key, step=step), conn=conn, ordering_key=key)
    worker = Running(db, registry)

    def done() -> list[tuple[str, int]]:
        return [
            (str(k), int(s))
            for k, s in admin_query(db, "SELECT key, step FROM steps_done ORDER BY at")
        ]

    try:
        wait_until(lambda: len(done()) == 8, timeout=20, interval=0.05)
    finally:
        worker.stop()
    handled = done()
    for key in ("a", "b", "c"):
        assert [s for k, s in handled if k == key] == sorted(s for k, s in handled if k == key)
    assert [s for k, s in handled if k == "a"] == [0, 1, 2]
    assert [s for k, s in handled if k == "b"] == [0, 2]  # 1 went dead, then 2 went on
    # While a1 was retried, a2 waited: a2 ran after a1's third attempt.
    assert handled.index(("a", 2)) > handled.index(("a", 1))
    assert attempts[("a", 1)] >= 3 and attempts[("b", 1)] >= 3
    assert admin_query(db, "SELECT status, payload FROM pgpubsub.message") == [
        ("dead", '{"key":"b","step":1}')
    ]


@pytest.mark.acceptance
def test_three_processes_keep_each_keys_order_while_keys_interleave(db: str) -> None:
    admin_query(db, "CREATE TABLE handled (key text, seq int, pid int, at bigint)")
    admin_query(db, "CREATE SEQUENCE handled_order")
    keys, per_key = 20, 500
    with psycopg.connect(db) as conn:
        for seq in range(per_key):
            for k in range(keys):
                pgpubsub.notify(_ordered(f"k{k}", seq), conn=conn, ordering_key=f"k{k}")
        conn.commit()
    proc = listen(db, "Ordered", 3)
    try:
        wait_until(
            lambda: admin_query(db, "SELECT count(*) FROM handled")[0][0] == keys * per_key,
            timeout=120,
            interval=0.5,
        )
    finally:
        stop(proc)
    rows = admin_query(db, "SELECT key, seq, pid FROM handled ORDER BY at")
    assert len(rows) == keys * per_key
    for k in range(keys):
        assert [r[1] for r in rows if r[0] == f"k{k}"] == list(range(per_key))
    assert len({r[2] for r in rows}) == 3  # every process took part
    # Keys interleave: the first 100 handled already span many keys.
    assert len({r[0] for r in rows[:100]}) >= 10


def _ordered(key: str, seq: int) -> Channel:
    from app.jobs import Ordered

    return Ordered(key=key, seq=seq)


@pytest.mark.acceptance
def test_max_in_flight_holds_across_four_processes(db: str) -> None:
    admin_query(db, "CREATE TABLE in_flight (id bigserial, n int, pid int, delta int)")
    from app.jobs import Limited

    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify_many(Limited, [{"n": i} for i in range(150)], conn=conn)
    proc = listen(db, "Limited", 4)
    try:
        wait_until(
            lambda: admin_query(db, "SELECT count(*) FROM in_flight")[0][0] == 300,
            timeout=120,
            interval=0.3,
        )
    finally:
        stop(proc)
    ((peak,),) = admin_query(
        db, "SELECT max(s) FROM (SELECT sum(delta) OVER (ORDER BY id) AS s FROM in_flight) x"
    )
    assert peak == 3  # reached, never exceeded (4 processes x concurrency 3 = 12 could run)
    assert admin_query(db, "SELECT count(DISTINCT pid) FROM in_flight")[0][0] >= 2


@pytest.mark.acceptance
def test_a_schedule_every_second_with_three_workers_runs_once_per_tick(db: str) -> None:
    admin_query(db, "CREATE TABLE ticks (scheduled_at timestamptz, pid int)")
    proc = listen(db, "EverySecond", 3)
    # Counted from the first tick: three processes starting beside other tests' took
    # over a second to start (8 ticks in 10.5 s from the launch, once in CI).
    wait_until(lambda: admin_query(db, "SELECT count(*) FROM ticks")[0][0], timeout=30)
    time.sleep(9.5)
    stop(proc)
    ticks = [r[0] for r in admin_query(db, "SELECT scheduled_at FROM ticks ORDER BY 1")]
    assert 9 <= len(ticks) <= 11, ticks
    assert len(set(ticks)) == len(ticks)
    assert all(t.microsecond == 0 for t in ticks)
    gaps = {(b - a).total_seconds() for a, b in zip(ticks, ticks[1:], strict=False)}
    assert gaps == {1.0}
    # No worker was running for 3 s: the missed ticks are stored at start, once.
    time.sleep(3)
    proc = listen(db, "EverySecond", 2)
    # Waited for, not slept: two processes starting beside other tests stored nothing
    # in 2 s once in CI.
    later = "SELECT count(*) FROM ticks WHERE scheduled_at > %s"
    wait_until(lambda: admin_query(db, later, (ticks[-1],))[0][0] >= 4, timeout=30)
    stop(proc)
    after = [r[0] for r in admin_query(db, "SELECT scheduled_at FROM ticks ORDER BY 1")]
    assert len(after) == len(set(after))
    missed = [t for t in after if ticks[-1] < t]
    gaps = {(b - a).total_seconds() for a, b in zip([ticks[-1], *missed], missed, strict=False)}
    assert gaps == {1.0} and len(missed) >= 4


def test_concurrency_runs_messages_of_one_channel_at_once_each_committed(db: str) -> None:
    @dataclass
    class Slow(Channel, name="slow", lock_notifications=True, concurrency=8):
        n: int

    admin_query(db, "CREATE TABLE slow_done (n int)")
    registry = Registry()
    lock = threading.Lock()
    running, peak = [0], [0]

    def handle(n: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        connection().execute("INSERT INTO slow_done VALUES (%s)", (n,))
        with lock:
            running[0] -= 1

    registry.add(Slow, handle)
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify_many(Slow, [{"n": i} for i in range(80)], conn=conn)
    worker = Running(db, registry)
    try:
        wait_until(lambda: admin_query(db, "SELECT count(*) FROM slow_done")[0][0] == 80)
        # The worker's counts (registry, metrics) add up its eight processors.
        wait_until(lambda: worker.worker.totals() == (80, 0))
    finally:
        worker.stop()
    assert peak[0] == 8  # eight at once, never more
    assert admin_query(db, "SELECT count(DISTINCT n) FROM slow_done") == [(80,)]
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message") == [(0,)]


def test_queue_options_need_a_durable_channel_and_sound_values() -> None:
    from pgpubsub.channel import spec_of

    for options, says in [
        ({"concurrency": 4}, "need lock_notifications=True"),
        ({"lock_notifications": True, "concurrency": 0}, "concurrency must be an int from 1"),
        ({"lock_notifications": True, "max_in_flight": 0}, "max_in_flight must be"),
        ({"lock_notifications": True, "schedule": "every day"}, "not a cron expression"),
        (
            {"lock_notifications": True, "schedule": "* * * * *", "timezone": "Mars/Base"},
            "unknown timezone",
        ),
    ]:
        # Checked at declaration, or at first use (the options that involve a schedule).
        with pytest.raises(ConfigurationError, match=re_escape(says)):
            spec_of(dataclass(type("Bad", (Channel,), {"__annotations__": {}}, **options)))
