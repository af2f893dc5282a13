"""Results of durable messages, awaiting them, and batches (issue 29)."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
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
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgpubsub
from pgpubsub import _results, cli, durable, messages
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
    text = _results.READ_SQL.replace("%s", "$1", 1).replace("%s", "$2", 1)
    return bool(admin_query(dsn, query, (text,))[0][0])


@pytest.mark.parametrize(
    "returned", [object(), "a NUL \x00 here", float("nan"), [1.0, {"x": float("inf")}]]
)
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


def settle_in_two(db: str, registry: Registry) -> list[int]:
    """Two processors, a message a claim, drain Step at once (a batch's two members settle
    side by side); how many each processed."""
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
    return [p.processed for p in procs]


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
        assert sorted(settle_in_two(db, registry)) == [1, 1]
    labels = sorted(p["label"] for (p,) in callbacks(db))
    assert labels == ["0", "1", "2"]
    assert all(p["batch"]["done"] == 2 for (p,) in callbacks(db))


@dataclass
class Other(Channel, lock_notifications=True, max_attempts=1):
    n: int


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
                    "UPDATE pgpubsub.batch SET total = 2, pending = 2 WHERE id = %s", (made[k],)
                )  # (the owner's edit: a second member, on the other channel, joins later)
                conn.execute(
                    "INSERT INTO pgpubsub.message (channel, payload, batch_id) VALUES (%s, %s, %s)",
                    (spec_of(Other).name, f'{{"n": {10 * round_ + 5 + k}}}', made[k]),
                )
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


# -- hostile review of issue 29 ---------------------------------------------------------------


class Roles:
    """Login roles granted with ``pgpubsub grant``, dropped at the end."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.made: list[str] = []

    def make(self, name: str, *flags: str) -> str:
        role = f"{name}_{conninfo_to_dict(self.dsn)['dbname']}"[:63]
        admin_query(self.dsn, f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'")
        self.made.append(role)
        assert cli.main(["grant", role, *flags, "--dsn", self.dsn]) == 0
        return make_conninfo(self.dsn, user=role, password="pw")

    def drop(self) -> None:
        for role in self.made:
            admin_query(self.dsn, f'DROP OWNED BY "{role}" CASCADE; DROP ROLE "{role}"')


@pytest.fixture
def roles(db: str) -> Iterator[Roles]:
    made = Roles(db)
    yield made
    made.drop()


def test_a_publisher_writes_batches_only_through_publish_batch(db: str, roles: Roles) -> None:
    """Finding 1 and 5: a publisher can neither write a batch row (its counts, which the
    owner-run trigger computes with) nor a member's batch_id (join a batch, or seed a future
    one); its batches are counted by the schema, and the channel's other messages run."""
    publisher = roles.make("pub", "--publisher")
    with psycopg.connect(db) as conn:
        target = pgpubsub.batch([Step(n=1)], on_complete=Finished("target"), conn=conn)
    next_id = int(target) + 1
    attacks = [
        (
            "INSERT INTO pgpubsub.batch (total, callback_channel, callback_payload) "
            "VALUES (-2147483648, 'x', '{}')"
        ),
        "INSERT INTO pgpubsub.message (channel, payload, batch_id) "
        f"VALUES ('{spec_of(Step).name}', '{{\"n\": 9}}', {int(target)})",
        "INSERT INTO pgpubsub.message (channel, payload, batch_id) "
        f"VALUES ('nobody', '{{}}', {next_id})",
        f"UPDATE pgpubsub.message SET batch_id = {int(target)}",
        "UPDATE pgpubsub.batch SET total = -2147483648",
    ]
    for attack in attacks:
        with (
            psycopg.connect(publisher, autocommit=True) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(attack)
    # The schema's function checks what it is given.
    with psycopg.connect(publisher, autocommit=True) as conn:
        for params in [("x", "{}", [], []), ("x", "[1]", ["a"], ["{}"]), ("x", "{}", ["a"], [])]:
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                conn.execute("SELECT pgpubsub.publish_batch(%s, %s, %s, %s)", params)
        made = pgpubsub.batch([Step(n=2), Step(n=3)], on_complete=Finished("theirs"), conn=conn)
    with psycopg.connect(db) as conn:
        pgpubsub.notify_many(Step, [{"n": n} for n in range(10, 20)], conn=conn)
    proc = drain(db, step_registry(), Step)
    assert proc.processed == 13
    outcomes = sorted(
        (p["label"], p["batch"]["total"], p["batch"]["done"]) for (p,) in callbacks(db)
    )
    assert outcomes == [("target", 1, 1), ("theirs", 2, 2)]
    assert admin_query(db, "SELECT total, done FROM pgpubsub.batch WHERE id = %s", (made,)) == [
        (2, 2)
    ]


def test_results_and_errors_are_read_only_by_awaiters_one_channel_at_a_time(
    db: str, roles: Roles
) -> None:
    """Finding 4 and 13: a publisher reads no message's result or error (an error may quote
    the payload); an awaiter reads one message's outcome by id and channel, never another
    channel's through a handle of its own."""
    publisher = roles.make("pub", "--publisher")
    awaiter = roles.make("await", "--awaiter")
    with psycopg.connect(db) as conn:
        resized = pgpubsub.notify(Resize(n=4), conn=conn)
        job = pgpubsub.notify(Job(n=5), conn=conn)
    drain(db, resize_registry(), Resize)
    registry = Registry()
    registry.add(Job, lambda n: n * 100)
    drain(db, registry, Job)
    for column in ("result", "last_error", "payload"):
        with (
            psycopg.connect(publisher, autocommit=True) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(f"SELECT {column} FROM pgpubsub.message")  # noqa: S608
    with pytest.raises(pgpubsub.errors.PermissionDenied):
        pgpubsub.handle(Resize, resized, dsn=publisher).result_sync(timeout=5)
    assert pgpubsub.handle(Resize, resized, dsn=awaiter).result_sync(timeout=5) == Thumb(
        40, "thumb-4"
    )
    assert pgpubsub.handle(Job, job, dsn=awaiter).result_sync(timeout=5) == 500
    with pytest.raises(MessageCancelled):  # Job's message is no Resize message
        pgpubsub.handle(Resize, job, dsn=awaiter).result_sync(timeout=5)
    with (
        psycopg.connect(awaiter, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT payload FROM pgpubsub.message")


def test_a_batch_on_an_autocommit_connection_is_published_whole_or_not_at_all(db: str) -> None:
    """Finding 2: one statement per batch, so an autocommit connection never commits part of
    one (a callback published over members not stored yet)."""
    admin_query(
        db,
        "ALTER TABLE pgpubsub.message ADD CONSTRAINT no_other "
        f"CHECK (channel <> '{spec_of(Other).name}')",
    )
    with psycopg.connect(db, autocommit=True) as conn:
        with pytest.raises(pgpubsub.errors.PgPubSubError):
            pgpubsub.batch([Step(n=1), Step(n=2), Other(n=3)], on_complete=Finished("x"), conn=conn)
        assert admin_query(db, "SELECT count(*) FROM pgpubsub.message") == [(0,)]
        assert admin_query(db, "SELECT count(*) FROM pgpubsub.batch") == [(0,)]
        made = pgpubsub.batch([Step(n=1), Step(n=2)], on_complete=Finished("y"), conn=conn)
    assert len(made.members) == 2
    drain(db, step_registry(), Step)
    [(payload,)] = callbacks(db)
    assert payload["batch"] == {"id": made, "total": 2, "done": 2, "dead": 0, "cancelled": 0}


def test_the_last_members_completed_concurrently_under_repeatable_read(db: str) -> None:
    """Finding 3: with the database's default_transaction_isolation 'repeatable read', two
    workers settling a batch's last two members at once still publish its callback once."""
    dbname = conninfo_to_dict(db)["dbname"]
    admin_query(
        db, f"ALTER DATABASE \"{dbname}\" SET default_transaction_isolation = 'repeatable read'"
    )
    for round_ in range(2):
        barrier = threading.Barrier(2, timeout=10)
        registry = Registry()
        registry.add(Step, lambda n, barrier=barrier: barrier.wait())
        with psycopg.connect(db) as conn:
            pgpubsub.batch(
                [Step(n=n) for n in range(2)], on_complete=Finished(str(round_)), conn=conn
            )
        assert sorted(settle_in_two(db, registry)) == [1, 1]
    got = sorted((p["label"], p["batch"]["done"]) for (p,) in callbacks(db))
    assert got == [("0", 2), ("1", 2)]


@dataclass
class Kept(Channel, lock_notifications=True, retention=1, max_attempts=2, retry_delay=300):
    n: int


def test_members_swept_by_the_retention_keep_their_outcome(db: str) -> None:
    """Finding 6: a done member swept after the retention while its batch is open is still
    counted done (its outcome is counted when it settles)."""
    fails = {2}
    registry = Registry()

    def kept(n: int) -> None:
        if n in fails:
            fails.discard(n)
            raise RuntimeError("once")

    registry.add(Kept, kept)
    with psycopg.connect(db) as conn:
        made = pgpubsub.batch([Kept(n=n) for n in range(3)], on_complete=Finished("k"), conn=conn)
    drain(db, registry, Kept)  # 0, 1 done; 2 to be retried
    admin_query(db, "UPDATE pgpubsub.message SET completed_at = completed_at - interval '1 hour'")
    drain(db, registry, Kept)  # sweeps 0 and 1
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message WHERE status = 'done'") == [(0,)]
    admin_query(db, "UPDATE pgpubsub.message SET run_at = now() WHERE status = 'pending'")
    drain(db, registry, Kept)
    [(payload,)] = callbacks(db)
    assert payload["batch"] == {"id": made, "total": 3, "done": 3, "dead": 0, "cancelled": 0}


def test_an_operator_locking_batches_in_another_order_does_not_run_listeners_twice(
    db: str,
) -> None:
    """Finding 7: an operator cancels a member of batch Y, then one of batch X, in one
    transaction, while a worker settles members of X and Y: the worker yields (its
    listeners run once), the operator's transaction goes through."""
    ran: list[int] = []
    go = threading.Event()
    registry = Registry()

    def step(n: int) -> None:
        ran.append(n)
        assert n == 1 or go.wait(10)  # the last one waits

    registry.add(Step, step)
    with psycopg.connect(db) as conn:
        x = pgpubsub.batch([Step(n=1), Other(n=1)], on_complete=Finished("X"), conn=conn)
        y = pgpubsub.batch([Step(n=2), Other(n=2)], on_complete=Finished("Y"), conn=conn)
    proc = processor(db, registry, Step)
    worker = threading.Thread(target=proc.drain_once)
    worker.start()
    try:
        wait_until(lambda: len(ran) == 2)
        with psycopg.connect(db) as operator:
            messages.cancel(operator, ids=[y.members[1]])  # Y's batch row locked
            go.set()
            wait_until(lambda: waiting_for_locks(db) == 1)  # the worker waits for Y
            messages.cancel(operator, ids=[x.members[1]])  # X: held by the worker
            operator.commit()
        worker.join(20)
    finally:
        go.set()
        worker.join(20)
        proc.session.close()
    assert sorted(ran) == [1, 2] and proc.processed == 2
    got = sorted(
        (p["label"], p["batch"]["done"], p["batch"]["cancelled"]) for (p,) in callbacks(db)
    )
    assert got == [("X", 1, 1), ("Y", 1, 1)]


def test_a_timeout_bounds_the_whole_wait_connecting_included(db: str) -> None:
    """Finding 9: a server that accepts the connection and never answers; and timeouts that
    are no number of seconds."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    silent = f"host=127.0.0.1 port={port} dbname=x user=x connect_timeout=60"
    waiting = pgpubsub.handle(Job, 1, dsn=silent)
    errors: list[BaseException] = []

    def wait_sync() -> None:
        try:
            waiting.result_sync(timeout=0.5)
        except BaseException as exc:
            errors.append(exc)

    try:
        started = time.monotonic()
        thread = threading.Thread(target=wait_sync, daemon=True)
        thread.start()
        thread.join(5)
        assert not thread.is_alive() and isinstance(errors[0], ResultTimeout)
        with pytest.raises(ResultTimeout):
            asyncio.run(asyncio.wait_for(waiting.result(timeout=0.5), 5))
        assert time.monotonic() - started < 5
    finally:
        server.close()
    for bad in (float("nan"), -1, float("inf"), "3"):
        with pytest.raises(pgpubsub.errors.ConfigurationError):
            waiting.result_sync(timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(pgpubsub.errors.ConfigurationError):
            asyncio.run(waiting.result(timeout=bad))  # type: ignore[arg-type]


def test_a_string_with_an_escaped_backslash_u0000_is_stored(db: str) -> None:
    """Finding 12: only a NUL character is refused, not the text backslash-u0000."""
    registry = Registry()
    registry.add(Job, lambda n: ["C:\\u0000data", "a\\\\u0000b", n])
    with psycopg.connect(db) as conn:
        made = pgpubsub.notify(Job(n=1), conn=conn)
    assert drain(db, registry, Job).processed == 1
    assert made.result_sync(timeout=5) == ["C:\\u0000data", "a\\\\u0000b", 1]


@pytest.mark.unit
def test_a_result_type_msgspec_cannot_decode_is_refused_at_class_definition() -> None:
    """Finding 14."""
    with pytest.raises(pgpubsub.errors.ConfigurationError, match="Result"):

        @dataclass
        class Bad(Channel, lock_notifications=True, results=True):
            Result = "Thumb"
            n: int


def test_batch_members_and_batches_are_swept_by_any_worker(db: str) -> None:
    """Finding 16: the done members of a channel without retention are swept after a day by
    a worker that completed none of them, and the batch row with them."""
    with psycopg.connect(db) as conn:
        made = pgpubsub.batch([Step(n=1), Step(n=2)], on_complete=Finished("s"), conn=conn)
    drain(db, step_registry(), Step)
    assert admin_query(
        db, "SELECT count(*) FROM pgpubsub.message WHERE batch_id = %s", (made,)
    ) == [(2,)]
    admin_query(
        db,
        "UPDATE pgpubsub.message SET completed_at = completed_at - interval '2 days' "
        "WHERE batch_id IS NOT NULL",
    )
    admin_query(db, "UPDATE pgpubsub.batch SET completed_at = completed_at - interval '2 days'")
    proc = drain(db, step_registry(), Step)  # a new worker: nothing to process
    assert proc.processed == 0
    assert admin_query(
        db, "SELECT count(*) FROM pgpubsub.message WHERE batch_id = %s", (made,)
    ) == [(0,)]
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.batch") == [(0,)]


def test_a_handle_keeps_the_host_name_and_pickles_no_password(db: str) -> None:
    """Finding 10: the conninfo a handle keeps names the host as given (libpq resolves it
    again, not the address one attempt used), and a pickled handle carries no password."""
    params = conninfo_to_dict(db)
    params["host"] = "localhost"
    with psycopg.connect(make_conninfo(**params)) as conn:
        made = pgpubsub.notify(Resize(n=1), conn=conn)
    assert made.conninfo is not None
    kept = conninfo_to_dict(made.conninfo)
    assert kept["host"] == "localhost" and "hostaddr" not in kept
    secret = _results.Handle(int(made), made.spec, make_conninfo(made.conninfo, password="s3cr3t"))
    assert b"s3cr3t" not in pickle.dumps(secret)
    drain(db, resize_registry(), Resize)
    assert pickle.loads(pickle.dumps(secret)).result_sync(timeout=5) == Thumb(10, "thumb-1")


def test_waits_gathered_in_one_event_loop_share_one_connection(db: str) -> None:
    """Finding 11: a waiter per message must not cost a server connection per message (150
    gathered waits took 151 backends, 230 locked the workers out)."""
    with psycopg.connect(db) as conn:
        handles = [pgpubsub.notify(Job(n=n), conn=conn) for n in range(60)]
        slow = pgpubsub.notify(Job(n=1000), conn=conn)
    registry = Registry()
    registry.add(Job, lambda n: n * 2)

    def backends() -> int:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        return int(admin_query(db, query)[0][0])  # type: ignore[call-overload]

    async def main() -> list[Any]:
        waits = [asyncio.ensure_future(h.result(timeout=30)) for h in handles]
        late = asyncio.ensure_future(slow.result(timeout=0.5))
        await asyncio.sleep(0.3)
        during = backends()
        with pytest.raises(ResultTimeout):  # one wait's timeout leaves the others waiting
            await late
        await asyncio.to_thread(drain, db, registry, Job)
        values = await asyncio.gather(*waits)
        return [during, *values]

    during, *values = asyncio.run(main())
    assert during <= 3  # the shared waiting connection, the probe's own (and a spare)
    assert values == [n * 2 for n in range(60)]
