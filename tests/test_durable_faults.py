"""Faults the hostile review of the failure isolation found (each failed on the code it tried).

A dropped session with ``max_attempts=1``; listeners that raise a database
error of their own, SystemExit or CancelledError, or an error text of many
megabytes; publishers of two keys in opposite orders; and a ``max_in_flight``
slot held by a worker without a registry row, past the lease's time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from helpers import Running, admin_query, terminate_sessions, wait_until

import pgpubsub
from pgpubsub import _leases, errors
from pgpubsub.channel import Channel, spec_of
from pgpubsub.durable import connection, migrate
from pgpubsub.listen import Registry


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    migrate(dsn)
    admin_query(dsn, "CREATE TABLE effects (n int)")
    yield dsn


def states(dsn: str) -> dict[str, int]:
    rows = admin_query(dsn, "SELECT status, count(*) FROM pgpubsub.message GROUP BY 1")
    return {str(s): int(c) for s, c in rows}  # type: ignore[call-overload]


def effects(dsn: str) -> list[int]:
    return sorted(int(n) for (n,) in admin_query(dsn, "SELECT n FROM effects"))  # type: ignore[call-overload]


@dataclass
class Once(Channel, lock_notifications=True, max_attempts=1):
    n: int


def test_a_dropped_session_kills_no_message_with_one_attempt(db: str) -> None:
    """max_attempts=1: the messages of a batch cut short by a killed session ran no
    listener to its end (or not at all); each is run alone, not dead-lettered."""
    registry = Registry()

    def slow(n: int) -> None:
        time.sleep(0.1)
        connection().execute("INSERT INTO effects VALUES (%s)", (n,))

    registry.add(Once, slow)
    with psycopg.connect(db) as conn:
        pgpubsub.notify_many(Once, [{"n": i} for i in range(10)], conn=conn)
    worker = Running(db, registry)
    try:
        time.sleep(0.35)  # a few messages into the first batch
        terminate_sessions(db)
        wait_until(lambda: states(db) == {}, timeout=30)
    finally:
        worker.stop()
    assert effects(db) == list(range(10))


@dataclass
class Mixed(Channel, lock_notifications=True, retry_delay=60):
    n: int


def test_a_listeners_own_database_error_fails_only_its_message(db: str) -> None:
    """A statement timeout, a deadlock or a failed connect elsewhere is an
    OperationalError, yet the session is fine: the message fails, alone."""
    registry = Registry()
    ran: list[int] = []

    def listener(n: int) -> None:
        ran.append(n)
        conn = connection()
        if n == 2:
            conn.execute("SET LOCAL statement_timeout = '50ms'")
            conn.execute("SELECT pg_sleep(1)")
        time.sleep(0.01)  # slow enough for a savepoint per message
        conn.execute("INSERT INTO effects VALUES (%s)", (n,))

    registry.add(Mixed, listener)
    with psycopg.connect(db) as conn:
        pgpubsub.notify_many(Mixed, [{"n": i} for i in range(5)], conn=conn)
    worker = Running(db, registry)
    try:
        wait_until(lambda: len(effects(db)) == 4, timeout=20)
        wait_until(lambda: worker.worker.status().durable[0].failed == 1, timeout=10)
        status = worker.worker.status().durable[0]
    finally:
        worker.stop()
    assert sorted(ran) == [0, 1, 2, 3, 4]  # nobody ran twice
    assert effects(db) == [0, 1, 3, 4]
    (error,) = admin_query(db, "SELECT last_error FROM pgpubsub.message WHERE status = 'pending'")
    assert "QueryCanceled" in str(error[0])
    assert (status.processed, status.failed) == (4, 1)


@dataclass
class OneSlot(Channel, lock_notifications=True, max_in_flight=1, max_attempts=1):
    n: int


@pytest.mark.parametrize("raised", [SystemExit(3), asyncio.CancelledError()])
def test_a_listener_raising_a_base_exception_fails_its_message_and_the_channel_goes_on(
    db: str, raised: BaseException
) -> None:
    registry = Registry()

    def listener(n: int) -> None:
        if n == 3:
            raise raised
        connection().execute("INSERT INTO effects VALUES (%s)", (n,))

    registry.add(OneSlot, listener)
    with psycopg.connect(db) as conn:
        pgpubsub.notify_many(OneSlot, [{"n": i} for i in range(8)], conn=conn)
    worker = Running(db, registry)
    try:
        wait_until(lambda: len(effects(db)) == 7, timeout=20)
        assert all(p.alive for p in worker.worker.status().durable)
    finally:
        worker.stop()
    assert states(db) == {"dead": 1}
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.lease") == [(0,)]


@dataclass
class Loud(Channel, lock_notifications=True, max_attempts=1):
    n: int


def test_an_error_text_of_megabytes_is_stored_cut_and_nothing_hangs(db: str) -> None:
    registry = Registry()

    def listener(n: int) -> None:
        if n == 1:
            raise RuntimeError("x" * 20_000_000)
        connection().execute("INSERT INTO effects VALUES (%s)", (n,))

    registry.add(Loud, listener)
    with psycopg.connect(db) as conn:
        pgpubsub.notify_many(Loud, [{"n": i} for i in range(3)], conn=conn)
    assert pgpubsub.process_stored_notifications([Loud], dsn=db, registry=registry) == 2
    (size, text) = admin_query(
        db, "SELECT length(last_error), right(last_error, 200) FROM pgpubsub.message"
    )[0]
    assert int(size) < 70_000  # type: ignore[call-overload]
    assert "characters cut" in str(admin_query(db, "SELECT last_error FROM pgpubsub.message")[0])
    assert "RuntimeError" in str(text) or "xxxx" in str(text)
    assert effects(db) == [0, 2]


@dataclass
class Keyed(Channel, lock_notifications=True):
    n: int


def test_publishers_of_two_keys_in_opposite_orders_get_a_clear_error(db: str) -> None:
    first, second = psycopg.connect(db), psycopg.connect(db)
    failures: list[BaseException] = []
    try:
        pgpubsub.notify(Keyed(n=1), conn=first, ordering_key="a")
        pgpubsub.notify(Keyed(n=2), conn=second, ordering_key="b")

        def cross(conn: Any, key: str) -> None:
            try:
                pgpubsub.notify(Keyed(n=3), conn=conn, ordering_key=key)
                conn.commit()
            except BaseException as exc:
                failures.append(exc)
                conn.rollback()

        threads = [
            threading.Thread(target=cross, args=(first, "b")),
            threading.Thread(target=cross, args=(second, "a")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        first.close()
        second.close()
    (failure,) = failures
    assert isinstance(failure, errors.DatabaseError)
    assert not isinstance(failure, errors.ConnectionLost)
    assert "deadlock" in str(failure)


@dataclass
class Scarce(Channel, lock_notifications=True, max_in_flight=1):
    n: int


def test_a_slot_outlives_its_lease_time_while_its_unregistered_worker_runs(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers without a registry row (register=False) renew their leases too."""
    monkeypatch.setattr(_leases, "TTL", 1.0)
    spans: list[tuple[int, float, float]] = []

    def listener(n: int) -> None:
        started = time.monotonic()
        time.sleep(3)  # three lease times
        spans.append((n, started, time.monotonic()))

    registry = Registry()
    registry.add(Scarce, listener)
    workers = [Running(db, registry, register=False) for _ in range(2)]
    try:
        with psycopg.connect(db) as conn:
            pgpubsub.notify_many(Scarce, [{"n": 1}, {"n": 2}], conn=conn)
        wait_until(lambda: len(spans) == 2, timeout=30)
    finally:
        for worker in workers:
            worker.stop()
    (_, a1, b1), (_, a2, b2) = sorted(spans, key=lambda s: s[1])
    assert a2 >= b1, "two listeners ran under max_in_flight=1"


@dataclass
class Kept(Channel, lock_notifications=True, max_attempts=2, retention=600):
    n: int


def test_sessions_killed_under_a_live_worker_charge_no_attempt(db: str) -> None:
    """A lost session is no crash of the message: the live worker gives its batch back."""
    registry = Registry()

    def slow(n: int) -> None:
        time.sleep(0.05)
        connection().execute("INSERT INTO effects VALUES (%s)", (n,))

    registry.add(Kept, slow)
    with psycopg.connect(db) as conn:
        pgpubsub.notify_many(Kept, [{"n": i} for i in range(20)], conn=conn)
    worker = Running(db, registry)
    try:
        for _ in range(3):
            time.sleep(0.2)
            terminate_sessions(db)
        wait_until(lambda: states(db) == {"done": 20}, timeout=60)
    finally:
        worker.stop()
    assert effects(db) == list(range(20))
    attempts = admin_query(db, "SELECT DISTINCT attempts FROM pgpubsub.message")
    assert attempts == [(1,)], attempts


@dataclass
class Many(Channel, lock_notifications=True, concurrency=16):
    n: int


def test_a_stop_waits_one_grace_however_many_listeners_outlast_it(db: str) -> None:
    """16 processors in listeners that outlast a grace of 1 s: the stop returns after about
    one grace. Each processor was stopped and joined in a thread of asyncio's default pool
    (6 threads on 2 cores), each with the whole grace: 3 graces (review of issue 26,
    outside its change; at concurrency=32 and the 10 s grace, 60 s)."""
    from helpers import DurableRunning

    release = threading.Event()
    started: list[int] = []
    registry = Registry()
    registry.add(Many, lambda n: (started.append(n), release.wait(30)))
    run = DurableRunning(db, [Many], registry)
    try:
        with psycopg.connect(db) as conn:
            for n in range(16):
                pgpubsub.notify(Many(n=n), conn=conn)  # type: ignore[call-arg]
                conn.commit()
        wait_until(lambda: len(started) == 16, timeout=20)
        t0 = time.monotonic()
        run.loop.run(run.durable.stop(1.0), timeout=60)
        took = time.monotonic() - t0
    finally:
        release.set()
        run.loop.run(run.engine.stop(), timeout=20)
        run.loop.close()
    assert took < 2.0, took


def test_a_start_that_fails_leaves_no_thread_running(db: str) -> None:
    """The worker's LISTEN fails as the durable side starts (its connection lost, say): the
    start raises, and it leaves nothing running. The lease keeper went on renewing the
    worker's leases every few seconds, in a thread of its own, for as long as the process
    lived (noted in issue 26's reviews)."""
    from pgpubsub.durable import DurableRunner
    from pgpubsub.engine import Engine

    engine = Engine(db)
    runner = DurableRunner(engine, [spec_of(Once)], Registry())

    async def lost(*args: Any, **kwargs: Any) -> None:
        raise errors.DatabaseConnectionError("connection lost while subscribing")

    engine.subscribe = lost  # type: ignore[method-assign]
    before = set(threading.enumerate())
    with pytest.raises(errors.DatabaseConnectionError):
        asyncio.run(runner.start())
    time.sleep(0.2)
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == [], left
