"""Results of durable messages, awaiting them, and batches (issue 29)."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import admin_query, terminate_sessions, wait_until

import pgpubsub
from pgpubsub import _results, durable, messages
from pgpubsub._processor import ChannelProcessor
from pgpubsub.channel import Channel, spec_of
from pgpubsub.errors import MessageCancelled, MessageFailed, ResultTimeout
from pgpubsub.listen import Registry
from pgpubsub.session import PsycopgSession

TESTS = Path(__file__).parent


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    durable.migrate(dsn)
    admin_query(dsn, "CREATE TABLE effects (kind text, n int, pid int)")
    yield dsn


@dataclass
class Thumb:
    width: int
    name: str


@dataclass
class Resize(Channel, lock_notifications=True, results=True, max_attempts=1):
    Result = Thumb
    n: int


@dataclass
class Job(Channel, lock_notifications=True, results=True, max_attempts=2, retry_delay=0.01):
    n: int


@dataclass
class Step(Channel, lock_notifications=True, max_attempts=1):
    n: int


@dataclass
class Finished(Channel, lock_notifications=True, retention=600):
    label: str
    batch: pgpubsub.BatchOutcome | None = None


def processor(dsn: str, registry: Registry, channel: Any) -> ChannelProcessor:
    spec = spec_of(channel)
    proc = ChannelProcessor(PsycopgSession(dsn), spec, registry.listeners(spec))
    proc.session.open()
    return proc


def drain(dsn: str, registry: Registry, channel: Any) -> ChannelProcessor:
    proc = processor(dsn, registry, channel)
    try:
        proc.drain_once()
    finally:
        proc.session.close()
    return proc


def effects(dsn: str, kind: str = "job") -> list[int]:
    return sorted(n for (n,) in admin_query(dsn, "SELECT n FROM effects WHERE kind = %s", (kind,)))  # type: ignore[misc]


def resize_registry() -> Registry:
    registry = Registry()

    def resize(n: int) -> Thumb:
        durable.connection().execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        return Thumb(width=n * 10, name=f"thumb-{n}")

    registry.add(Resize, resize)
    return registry


# -- results ----------------------------------------------------------------------------


def test_the_result_is_stored_with_the_effects_and_typed_by_the_channel(db: str) -> None:
    with psycopg.connect(db) as conn:
        handles = [pgpubsub.notify(Resize(n=n), conn=conn) for n in range(3)]
    assert all(isinstance(h, pgpubsub.Handle) and isinstance(h, int) for h in handles)
    drain(db, resize_registry(), Resize)
    assert effects(db) == [0, 1, 2]
    stored = admin_query(db, "SELECT status, result FROM pgpubsub.message ORDER BY id")
    assert stored == [("done", {"width": n * 10, "name": f"thumb-{n}"}) for n in range(3)]
    assert [h.result_sync(timeout=5) for h in handles] == [
        Thumb(n * 10, f"thumb-{n}") for n in range(3)
    ]


def test_a_message_whose_commit_fails_stores_no_result(db: str) -> None:
    """The result is written by the statement that completes the message: a listener whose
    writes fail at COMMIT leaves neither its effects nor a result, and its neighbours keep
    both. Invariant: a message has a result exactly when its effects committed."""
    admin_query(db, "CREATE TABLE parent (id int PRIMARY KEY)")
    admin_query(db, "INSERT INTO parent SELECT i FROM generate_series(0, 9) i WHERE i <> 4")
    admin_query(
        db, "CREATE TABLE child (parent_id int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)"
    )
    registry = Registry()

    def write(n: int) -> int:
        conn = durable.connection()
        conn.execute("SET CONSTRAINTS ALL DEFERRED")  # checked at COMMIT only
        conn.execute("INSERT INTO child VALUES (%s)", (n,))
        conn.execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        return n * 2

    registry.add(Job, write)
    with psycopg.connect(db) as conn:
        pgpubsub.notify_many(Job, [{"n": n} for n in range(10)], conn=conn)
    drain(db, registry, Job)
    stored = admin_query(
        db, "SELECT (payload::json->>'n')::int, status, result FROM pgpubsub.message ORDER BY id"
    )
    committed = set(effects(db))
    assert committed == set(range(10)) - {4}
    for n, status, result in stored:
        assert (result is not None) == (n in committed), (n, status, result)
        if n in committed:
            assert (status, result) == ("done", n * 2)
    assert [s for n, s, _ in stored if n == 4] == ["pending"]  # its retry is due later


def test_await_a_message_completed_long_ago_and_one_completed_while_waiting(db: str) -> None:
    registry = resize_registry()
    with psycopg.connect(db) as conn:
        early = pgpubsub.notify(Resize(n=1), conn=conn)
    drain(db, registry, Resize)
    with psycopg.connect(db) as conn:
        late = pgpubsub.notify(Resize(n=2), conn=conn)

    async def both() -> tuple[Any, Any, float]:
        first = await early.result(timeout=5)
        waiting = asyncio.ensure_future(late.result(timeout=10))
        await asyncio.sleep(0.2)  # let it LISTEN (not a synchronisation: it works either way)
        started = time.monotonic()
        await asyncio.to_thread(drain, db, registry, Resize)
        return first, await waiting, time.monotonic() - started

    first, second, took = asyncio.run(both())
    assert first == Thumb(10, "thumb-1") and second == Thumb(20, "thumb-2")
    # Woken by the completion's NOTIFY, not by the poll fallback (every 5 s).
    assert took < 3, took


def test_a_timeout_raises_and_leaves_the_message_alone(db: str) -> None:
    with psycopg.connect(db) as conn:
        h = pgpubsub.notify(Job(n=1), conn=conn)
    before = admin_query(db, "SELECT status, attempts, run_at, result FROM pgpubsub.message")
    with pytest.raises(ResultTimeout) as caught:
        h.result_sync(timeout=0.3)
    assert isinstance(caught.value, TimeoutError) and str(int(h)) in str(caught.value)
    with pytest.raises(ResultTimeout):
        asyncio.run(h.result(timeout=0.2))
    assert (
        admin_query(db, "SELECT status, attempts, run_at, result FROM pgpubsub.message") == before
    )
    registry = Registry()
    registry.add(Job, lambda n: n + 1)
    drain(db, registry, Job)
    assert h.result_sync(timeout=5) == 2  # still processed once, as if nobody had waited


def test_a_dead_message_raises_its_error_and_wakes_its_waiter(db: str) -> None:
    registry = Registry()

    def fail(n: int) -> None:
        raise ValueError(f"no thumbnail for {n}")

    registry.add(Resize, fail)
    with psycopg.connect(db) as conn:
        h = pgpubsub.notify(Resize(n=7), conn=conn)
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            h.result_sync(timeout=10)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)  # it LISTENs (either way it finds the outcome)
    started = time.monotonic()
    drain(db, registry, Resize)
    waiter.join(10)
    assert time.monotonic() - started < 3  # the dead message's NOTIFY woke it
    [exc] = outcome
    assert isinstance(exc, MessageFailed) and exc.message_id == int(h)
    assert "ValueError: no thumbnail for 7" in exc.error and "no thumbnail for 7" in str(exc)
    assert pickle.loads(pickle.dumps(exc)).args == exc.args


def test_a_cancelled_message_raises_message_cancelled(db: str) -> None:
    with psycopg.connect(db) as conn:
        h = pgpubsub.notify(Job(n=1), conn=conn)
    with psycopg.connect(db, autocommit=True) as conn:
        assert messages.cancel(conn, ids=[int(h)]) == 1
    with pytest.raises(MessageCancelled):
        h.result_sync(timeout=5)


def test_a_handle_is_rebuilt_from_its_id(db: str) -> None:
    with psycopg.connect(db) as conn:
        mid = int(pgpubsub.notify(Resize(n=3), conn=conn))
    drain(db, resize_registry(), Resize)
    rebuilt = pgpubsub.handle(Resize, mid, dsn=db)
    assert rebuilt == mid and rebuilt.result_sync(timeout=5) == Thumb(30, "thumb-3")
    by_path = pgpubsub.handle(f"{Resize.__module__}.Resize", mid, dsn=db)
    assert pickle.loads(pickle.dumps(by_path)).result_sync(timeout=5) == Thumb(30, "thumb-3")
    with pytest.raises(pgpubsub.ConfigurationError, match="keeps no results"):
        pgpubsub.handle(Step, mid, dsn=db)


@pytest.mark.chaos  # killed backends
@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_waiter_whose_session_is_ended_connects_again_and_finds_the_outcome(
    db: str, how: str
) -> None:
    """The waiter's session is ended (a failover, a proxy) while it waits and the message
    completes meanwhile: its NOTIFY is lost with the session; the waiter connects again,
    reads the message and returns its value, well before its poll interval (5 s)."""
    with psycopg.connect(db) as conn:
        h = pgpubsub.notify(Job(n=5), conn=conn)
    got: list[Any] = []

    def wait() -> None:
        try:
            if how == "sync":
                got.append(h.result_sync(timeout=20))
            else:
                got.append(asyncio.run(h.result(timeout=20)))
        except BaseException as exc:
            got.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: listening(db), timeout=10)
    # Completed (as a worker would, but with no announcement) as the waiter is cut off.
    admin_query(
        db, "UPDATE pgpubsub.message SET status = 'done', result = '15' WHERE id = %s", (h,)
    )
    terminate_sessions(db)
    started = time.monotonic()
    waiter.join(20)
    assert got == [15] and time.monotonic() - started < 4


def listening(dsn: str) -> bool:
    """A waiter has read its message after its LISTEN, and waits."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle' AND query = %s"
    return bool(admin_query(dsn, query, (_results.STATE_SQL.replace("%s", "$1"),))[0][0])


@pytest.mark.parametrize("returned", [object(), "a NUL \x00 here"])
def test_a_result_that_cannot_be_stored_fails_its_attempt(db: str, returned: Any) -> None:
    registry = Registry()

    def odd(n: int) -> Any:
        durable.connection().execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        return returned if n == 1 else n

    registry.add(Job, odd)
    with psycopg.connect(db) as conn:
        pgpubsub.notify_many(Job, [{"n": n} for n in range(3)], conn=conn)
    proc = drain(db, registry, Job)
    assert (proc.processed, proc.failed) == (2, 1)
    assert effects(db) == [0, 2]  # the failed attempt's writes are undone with it
    [(status, error)] = admin_query(
        db, "SELECT status, last_error FROM pgpubsub.message WHERE result IS NULL"
    )
    assert status == "pending" and "PayloadError" in str(error) and Job.__qualname__ in str(error)


@pytest.mark.unit
def test_a_results_channel_keeps_its_outcomes_a_day_by_default() -> None:
    from pgpubsub.channel import RESULT_RETENTION, kept_for

    assert kept_for(Job) == RESULT_RETENTION == 86400
    assert kept_for(Finished) == 600 and kept_for(Step) == 0
    with pytest.raises(pgpubsub.ConfigurationError, match="results need lock_notifications"):

        @dataclass
        class Plain(Channel, results=True):
            n: int

        spec_of(Plain)


# -- batches ----------------------------------------------------------------------------------


def callbacks(dsn: str) -> list[tuple[Any, ...]]:
    return admin_query(
        dsn,
        "SELECT payload::jsonb FROM pgpubsub.message WHERE channel = %s",
        (spec_of(Finished).name,),
    )


def test_a_batch_reports_done_dead_and_cancelled_members_once(db: str) -> None:
    registry = Registry()

    def step(n: int) -> None:
        durable.connection().execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        if n == 2:
            raise RuntimeError("step 2 breaks")

    registry.add(Step, step)
    with psycopg.connect(db) as conn:
        made = pgpubsub.batch(
            [Step(n=n) for n in range(4)], on_complete=Finished(label="all"), conn=conn
        )
    assert len(made.members) == 4
    with psycopg.connect(db, autocommit=True) as conn:
        messages.cancel(conn, ids=[made.members[3]])
    assert callbacks(db) == []
    drain(db, registry, Step)
    [(payload,)] = callbacks(db)
    assert payload == {
        "label": "all",
        "batch": {"id": made, "total": 4, "done": 2, "dead": 1, "cancelled": 1},
    }
    got: list[Any] = []
    finished = Registry()
    finished.add(Finished, lambda label, batch: got.append((label, batch)))
    drain(db, finished, Finished)
    assert got == [("all", pgpubsub.BatchOutcome(int(made), 4, 2, 1, 1))]
    # A dead member replayed after its batch finished is not counted again.
    with psycopg.connect(db, autocommit=True) as conn:
        messages.replay(conn, ids=[made.members[2]])
    again = Registry()
    again.add(Step, lambda n: None)
    drain(db, again, Step)
    assert admin_query(
        db, "SELECT status FROM pgpubsub.message WHERE id = %s", (made.members[2],)
    ) == [("done",)]
    assert len(callbacks(db)) == 1
    assert admin_query(db, "SELECT done, dead, cancelled FROM pgpubsub.batch") == [(2, 1, 1)]


def test_a_batch_published_on_an_async_connection_joins_its_transaction(db: str) -> None:
    async def publish(commit: bool) -> pgpubsub.Batch:
        async with await psycopg.AsyncConnection.connect(db) as conn:
            made = await pgpubsub.abatch(
                [Step(n=1), Step(n=2)], on_complete=Finished("async"), conn=conn
            )
            await (conn.commit() if commit else conn.rollback())
            return made

    asyncio.run(publish(commit=False))
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message") == [(0,)]
    made = asyncio.run(publish(commit=True))
    assert len(made.members) == 2
    drain(db, step_registry(), Step)
    [(payload,)] = callbacks(db)
    assert payload["batch"] == {"id": made, "total": 2, "done": 2, "dead": 0, "cancelled": 0}


def step_registry() -> Registry:
    registry = Registry()
    registry.add(Step, lambda n: None)
    return registry


def test_the_last_members_completed_concurrently_publish_one_callback(db: str) -> None:
    """Two workers complete the last two members of a batch at the same moment (both
    transactions open at once): exactly one of them publishes the callback."""
    for round_ in range(3):
        barrier = threading.Barrier(2, timeout=10)
        registry = Registry()

        def step(n: int, barrier: threading.Barrier = barrier) -> None:
            durable.connection().execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
            barrier.wait()  # both listeners run, in two open transactions

        registry.add(Step, step)
        with psycopg.connect(db) as conn:
            pgpubsub.batch(
                [Step(n=n) for n in range(2)], on_complete=Finished(label=str(round_)), conn=conn
            )
        procs = [processor(db, registry, Step) for _ in range(2)]
        for proc in procs:
            proc.claim_size = 1
        threads = [threading.Thread(target=p.drain_once) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        for proc in procs:
            proc.session.close()
        assert sorted(p.processed for p in procs) == [1, 1]
    labels = sorted(p["label"] for (p,) in callbacks(db))
    assert labels == ["0", "1", "2"]
    assert all(p["batch"]["done"] == 2 for (p,) in callbacks(db))


@dataclass
class Other(Channel, lock_notifications=True, max_attempts=1):
    n: int


MEMBERS_SQL = _results.MEMBERS_SQL


def test_members_of_several_batches_completed_at_once_do_not_deadlock(db: str) -> None:
    """Two processors complete members of the same three batches at the same moment, in
    orders of their own (the order a statement visits its rows is the plan's): they must not
    deadlock on the batch rows (a deadlock fails a processing transaction, and its listeners
    run again: a listener's external effects twice). Rounds, as the orders vary."""
    ran: list[int] = []
    registry = Registry()

    def work(n: int) -> None:
        ran.append(n)
        durable.connection().execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))

    registry.add(Step, work)
    registry.add(Other, work)
    rounds = 6
    for round_ in range(rounds):
        with psycopg.connect(db) as conn:  # ids: Step's A, B, C; Other's C, B, A
            made = [
                pgpubsub.batch([Step(n=10 * round_ + k)], on_complete=Finished(str(k)), conn=conn)
                for k in range(3)
            ]
            for k in reversed(range(3)):
                conn.execute(
                    "UPDATE pgpubsub.batch SET total = 2 WHERE id = %s", (made[k],)
                )  # (the owner's edit: a second member, on the other channel, joins later)
                conn.execute(
                    MEMBERS_SQL,
                    (spec_of(Other).name, made[k], f'{{"n": {10 * round_ + 5 + k}}}',
                     spec_of(Other).name),
                )  # fmt: skip
        procs = [processor(db, registry, Step), processor(db, registry, Other)]
        threads = [threading.Thread(target=p.drain_once) for p in procs]
        # The batch rows held, so that both processors reach their completion and wait
        # there; released together, each then takes the rest in its own order.
        with psycopg.connect(db) as holder:
            holder.execute("SELECT FROM pgpubsub.batch FOR UPDATE")
            for t in threads:
                t.start()
            wait_until(lambda: waiting_for_locks(db) == 2, timeout=10)
        for t in threads:
            t.join(30)
        for proc in procs:
            proc.session.close()
    assert len(ran) == 6 * rounds and len(set(ran)) == len(ran)  # no listener ran twice
    assert len(callbacks(db)) == 3 * rounds


def waiting_for_locks(dsn: str) -> int:
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()"
    )
    return int(admin_query(dsn, query)[0][0])  # type: ignore[call-overload]


# -- worker processes -------------------------------------------------------------------------


def worker(db: str, **env: str) -> subprocess.Popen[bytes]:
    environ = {**os.environ, "PGPUBSUB_DSN": db, "PYTHONPATH": str(TESTS), **env}
    cmd = [sys.executable, "-m", "pgpubsub", "listen", "app.results_listeners", "--worker"]
    return subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL)


@pytest.mark.acceptance  # worker processes
def test_await_results_across_processes(db: str) -> None:
    from app.results_listeners import Square

    proc = worker(db)
    try:
        with psycopg.connect(db) as conn:
            handles = [pgpubsub.notify(Square(n=n), conn=conn) for n in range(5)]

        async def gather() -> list[Any]:
            return await asyncio.gather(*(h.result(timeout=30) for h in handles))

        results = asyncio.run(gather())
    finally:
        proc.terminate()
        proc.wait(20)
    assert [r["square"] for r in results] == [n * n for n in range(5)]
    assert {r["pid"] for r in results} == {proc.pid}  # computed in the worker process


@pytest.mark.acceptance  # worker processes
def test_a_batch_callback_is_published_once_when_its_worker_dies_in_the_last_member(
    db: str, tmp_path: Path
) -> None:
    from app.results_listeners import AllDone, Member

    with psycopg.connect(db) as conn:
        made = pgpubsub.batch([Member(n=n) for n in range(5)], on_complete=AllDone("x"), conn=conn)
    env = {"CRASH_ON": "4", "CRASH_MARKER": str(tmp_path / "crashed")}
    proc: subprocess.Popen[bytes] | None = None
    deaths = 0
    deadline = time.monotonic() + 60

    def called() -> bool:
        return bool(admin_query(db, "SELECT 1 FROM effects WHERE kind = 'callback'"))

    try:
        while not called():
            assert time.monotonic() < deadline, admin_query(db, "TABLE pgpubsub.batch")
            if proc is None or proc.poll() is not None:
                deaths += proc is not None
                proc = worker(db, **env)
            time.sleep(0.02)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
    assert deaths == 1 and (tmp_path / "crashed").exists()
    assert effects(db, "member") == [0, 1, 2, 3, 4]  # the crashed attempt's write rolled back
    assert effects(db, "callback") == [5]
    assert admin_query(db, "SELECT total, done, dead, cancelled FROM pgpubsub.batch") == [
        (5, 5, 0, 0)
    ]
    [(payload,)] = admin_query(
        db,
        "SELECT payload::jsonb FROM pgpubsub.message WHERE channel = %s",
        (spec_of(AllDone).name,),
    )
    assert payload["batch"]["id"] == made
