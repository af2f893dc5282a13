"""Durable channels: exactly-once processing, retries, dead letters, recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from app.channels import Jobs, SeedStyleDurable
from helpers import Running, admin_query, wait_until
from test_cli import Listen

import pgpubsub
from pgpubsub import durable, messages
from pgpubsub._processor import MARK_ALONE_SQL, ChannelProcessor
from pgpubsub.channel import Channel, spec_of
from pgpubsub.listen import Registry
from pgpubsub.session import PsycopgSession
from pgpubsub.worker import Worker


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    durable.migrate(dsn)
    admin_query(dsn, "CREATE TABLE effects (kind text, n int, pid int)")
    yield dsn


def effects(dsn: str) -> dict[int, int]:
    return dict(admin_query(dsn, "SELECT n, count(*) FROM effects GROUP BY n"))  # type: ignore[arg-type]


def in_tx_recorder(registry: Registry, fail_on: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    def record(n: int, blob: str) -> None:
        durable.connection().execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        if n in fail_on:
            raise RuntimeError(f"poison {n}")

    registry.add(Jobs, record)


def run_worker(dsn: str, registry: Registry, until: Any, timeout: float = 30) -> None:
    run = Running(dsn, registry)
    try:
        wait_until(until, timeout=timeout, interval=0.05)
    finally:
        run.stop()


def publish(dsn: str, ns: list[int], blob: str = "") -> None:
    with psycopg.connect(dsn) as conn:
        pgpubsub.notify_many(Jobs, [{"n": n, "blob": blob} for n in ns], conn=conn)


def test_identical_messages_in_one_transaction_are_all_processed(db: str) -> None:
    registry = Registry()
    in_tx_recorder(registry)
    with psycopg.connect(db) as conn:
        for _ in range(5):
            pgpubsub.notify(Jobs, conn=conn, n=7)
    run_worker(db, registry, lambda: effects(db).get(7) == 5)
    time.sleep(0.3)
    assert effects(db) == {7: 5}


def test_large_payload_and_rollback(db: str) -> None:
    registry = Registry()
    in_tx_recorder(registry)
    with psycopg.connect(db) as conn:
        pgpubsub.notify(Jobs, conn=conn, n=1, blob="x" * 100_000)
        conn.rollback()
        pgpubsub.notify(Jobs, conn=conn, n=2, blob="é" * 100_000)
    run_worker(db, registry, lambda: effects(db) == {2: 1})
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message") == [(0,)]


def test_published_while_no_worker_runs_are_processed_once_after_start(db: str) -> None:
    registry = Registry()
    in_tx_recorder(registry)
    publish(db, list(range(1000)))
    run_worker(db, registry, lambda: len(effects(db)) == 1000)
    time.sleep(0.3)
    assert effects(db) == {n: 1 for n in range(1000)}


def test_poison_message_is_retried_to_the_limit_then_dead_then_replayed(db: str) -> None:
    registry = Registry()
    attempts: list[int] = []
    poisoned = {"on": True}

    def record(n: int) -> None:
        durable.connection().execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        if n == 500:
            attempts.append(n)
            if poisoned["on"]:
                raise RuntimeError("poison 500")

    registry.add(Jobs, record)
    publish(db, list(range(1000)))

    def dead_rows() -> list[tuple[object, ...]]:
        return admin_query(db, "SELECT count(*) FROM pgpubsub.message WHERE status='dead'")

    run_worker(db, registry, lambda: len(effects(db)) == 999 and dead_rows() == [(1,)])
    assert len(attempts) == Jobs.max_attempts == 3
    assert effects(db) == {n: 1 for n in range(1000) if n != 500}  # poison's writes rolled back
    with psycopg.connect(db, autocommit=True) as conn:
        (row,) = messages.list_messages(conn, "dead")
        assert row.attempts == 3 and "RuntimeError: poison 500" in (row.last_error or "")
        assert "Traceback" in (row.last_error or "")
        poisoned["on"] = False
        assert messages.replay(conn, ids=[row.id]).replayed == (row.id,)
    run_worker(db, registry, lambda: effects(db).get(500) == 1)
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message") == [(0,)]


def test_seed_style_attribute_and_process_stored_notifications(db: str) -> None:
    assert spec_of(SeedStyleDurable).lock
    registry = Registry()
    seen: list[int] = []
    registry.add(SeedStyleDurable, lambda n: seen.append(n))
    with psycopg.connect(db) as conn:
        for i in range(3):
            pgpubsub.notify(SeedStyleDurable, conn=conn, n=i)
    assert pgpubsub.process_stored_notifications([SeedStyleDurable], dsn=db, registry=registry) == 3
    assert seen == [0, 1, 2]


@pytest.mark.chaos
def test_killed_listener_backend_loses_and_duplicates_nothing(db: str) -> None:
    registry = Registry()
    in_tx_recorder(registry)

    async def main() -> None:
        worker = Worker(db, registry=registry)
        await worker.start()
        try:
            for round_ in range(5):
                await asyncio.to_thread(publish, db, list(range(round_ * 200, round_ * 200 + 200)))
                pid = worker.engine.status().backend_pid
                admin_query(db, "SELECT pg_terminate_backend(%s)", (pid,))
                await asyncio.sleep(0.3)
            deadline = time.monotonic() + 20
            while len(effects(db)) < 1000:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            await worker.stop()

    asyncio.run(main())
    assert effects(db) == {n: 1 for n in range(1000)}


@pytest.mark.acceptance
def test_four_processes_20k_messages_random_delays_exactly_once(db: str) -> None:
    publish(db, list(range(20_000)))
    run = Listen(db, "app.durable_listeners", "--processes", "4", env={"RANDOM_DELAY": "0.0005"})
    try:
        wait_until(
            lambda: admin_query(db, "SELECT count(*) FROM effects")[0][0] >= 20_000,
            timeout=120,
            interval=0.2,
        )
        time.sleep(0.5)
    finally:
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(30) == 0
    counts = effects(db)
    assert len(counts) == 20_000 and set(counts.values()) == {1}
    assert len({p for (p,) in admin_query(db, "SELECT DISTINCT pid FROM effects")}) >= 2


@pytest.mark.acceptance
def test_worker_sigkilled_in_handler_its_message_completed_once_by_another(
    db: str, tmp_path: Any
) -> None:
    hang = tmp_path / "hang"
    hang.write_text("")
    run = Listen(db, "app.durable_listeners", "--processes", "2", env={"HANG_FILE": str(hang)})
    try:
        wait_until(lambda: len(run.workers()) == 2, timeout=10)
        publish(db, [1, 2, 3, 4])
        pidfile = tmp_path / "hang.pid"
        wait_until(pidfile.exists, timeout=20)
        hang.unlink()  # the next attempt completes
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        wait_until(lambda: effects(db).get(3) == 1, timeout=20)
        time.sleep(0.5)
        assert effects(db) == {1: 1, 2: 1, 3: 1, 4: 1}
    finally:
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(30) == 0


def test_database_error_in_a_listener_fails_only_its_message(db: str) -> None:
    """A failing write may surface late (the fast path pipelines writes): still only its own."""
    admin_query(db, "CREATE UNIQUE INDEX ON effects (n)")
    admin_query(db, "INSERT INTO effects VALUES ('job', 50, 0)")  # message 50 will collide
    registry = Registry()
    in_tx_recorder(registry)
    publish(db, list(range(100)))
    dead = "SELECT count(*) FROM pgpubsub.message WHERE status = 'dead'"
    run_worker(db, registry, lambda: admin_query(db, dead) == [(1,)])
    assert effects(db) == {n: 1 for n in range(100)}  # 50 only from the row put there first
    with psycopg.connect(db) as conn:
        (row,) = messages.list_messages(conn, "dead")
    assert json.loads(row.payload)["n"] == 50 and "UniqueViolation" in (row.last_error or "")


def test_a_worker_dying_in_every_attempt_uses_them_up_and_the_message_ends_dead(db: str) -> None:
    """Attempts are counted when a message is claimed, not when its listener returns."""
    publish(db, [1])
    spec = spec_of(Jobs)
    for attempt in range(1, Jobs.max_attempts + 1):
        # Claim the way a worker does, then "die": the claim is all that is left.
        proc = ChannelProcessor(PsycopgSession(db), spec, [])
        proc.session.open()
        wait_until(lambda: admin_query(db, "SELECT run_at <= now() FROM pgpubsub.message")[0][0])
        # a suspect after its first attempt: met by a claim, then claimed alone; its
        # listener starts alone (marked so), then the process dies
        claimed = proc._claim()
        if attempt > 1:
            assert claimed == [] and proc._suspect is not None
            claimed = proc._claim(proc._suspect[0])
        ((mid, _, attempts, status, _, _, _, alone, *_),) = claimed
        if alone:
            with proc.session.atomic():
                mark = proc._in_parts(MARK_ALONE_SQL, [mid])
                proc.session.execute(mark, ([mid], [attempts]))
        proc.session.close()
        assert (attempts, status, alone) == (attempt, "pending", attempt > 1)
    wait_until(lambda: admin_query(db, "SELECT run_at <= now() FROM pgpubsub.message")[0][0])
    registry = Registry()
    in_tx_recorder(registry)
    run_worker(db, registry, lambda: admin_query(db, "SELECT status FROM pgpubsub.message")
               == [("dead",)])  # fmt: skip
    assert effects(db) == {}
    with psycopg.connect(db) as conn:
        (row,) = messages.list_messages(conn, "dead")
    assert "stopped before it completed (attempt 3)" in (row.last_error or "")


@dataclass
class Kept(Channel, lock_notifications=True, retention=0.5):
    n: int


def test_retention_keeps_completed_messages_then_expires_them(db: str) -> None:
    registry = Registry()
    registry.add(Kept, lambda n: None)
    with psycopg.connect(db) as conn:
        pgpubsub.notify_many(Kept, [{"n": 1}, {"n": 2}], conn=conn)
    done = (
        "SELECT count(*) FROM pgpubsub.message WHERE status = 'done' AND completed_at IS NOT NULL"
    )
    run_worker(db, registry, lambda: admin_query(db, done) == [(2,)])
    time.sleep(0.6)
    run_worker(db, registry, lambda: admin_query(db, "SELECT count(*) FROM pgpubsub.message")
               == [(0,)], timeout=5)  # fmt: skip


def test_messages_command_lists_shows_replays_and_purges(db: str) -> None:
    admin_query(
        db,
        "INSERT INTO pgpubsub.message (channel, payload, status, attempts, last_error) VALUES "
        "('jobs', '{\"n\": 1}', 'dead', 3, 'Traceback ...\nRuntimeError: one'), "
        "('jobs', '{\"n\": 2}', 'dead', 3, 'Traceback ...\nRuntimeError: two'), "
        "('other', '{}', 'dead', 1, 'x')",
    )
    ids = [i for (i,) in admin_query(db, "SELECT id FROM pgpubsub.message ORDER BY id")]

    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "pgpubsub", "messages", *args, "--dsn", db],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    header, *listing = cli("list", "--channel", "jobs").splitlines()
    assert header.split("\t")[:3] == ["id", "status", "channel"]
    assert [line.split("\t")[0] for line in listing] == [str(ids[0]), str(ids[1])]
    assert listing[0].endswith("RuntimeError: one")
    shown = cli("show", str(ids[1])).splitlines()  # text: the payload, then the traceback
    assert shown[0] == f"message {ids[1]}" and '      "n": 2' in shown
    assert shown[-2:] == ["    Traceback ...", "    RuntimeError: two"]
    assert cli("replay", str(ids[0])) == "replayed 1 message(s)\n"
    assert cli("purge", "--channel", "other", "--yes") == "purged 1 message(s)\n"
    assert admin_query(db, "SELECT id, status, attempts FROM pgpubsub.message ORDER BY id") == [
        (ids[0], "pending", 0),
        (ids[1], "dead", 3),
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "pgpubsub", "messages", "list", "--status", "gone", "--dsn", db],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "invalid choice: 'gone'" in bad.stderr


def test_worker_status_reports_durable_processing(db: str) -> None:
    registry = Registry()
    in_tx_recorder(registry, fail_on={7})
    run = Running(db, registry)
    try:
        publish(db, list(range(20)))
        wait_until(lambda: run.worker.status().durable[0].processed == 19, timeout=10)
        status = run.worker.status()
        assert status.healthy and status.engine.state == "listening"
        (proc,) = status.durable
        assert (proc.channel, proc.alive) == (spec_of(Jobs).name, True)
        assert proc.failed >= 1  # message 7, retried until dead
    finally:
        run.stop()
    assert not run.worker.status().healthy


def test_recovery_without_listeners_in_the_process_leaves_every_message_pending(db: str) -> None:
    publish(db, [1, 2, 3])
    with pytest.raises(pgpubsub.NoListener, match="import the module"):
        pgpubsub.process_stored_notifications([Jobs], dsn=db, registry=Registry())
    assert admin_query(
        db, "SELECT count(*) FROM pgpubsub.message WHERE status = 'pending' AND attempts = 0"
    ) == [(3,)]


def test_a_claim_probes_its_rows_whatever_the_statistics_say(dsn: str) -> None:
    """Statistics taken when the queue was empty (autoanalyze often finds it so) made the
    claim's UPDATE loop over the whole batch for each claimed row: a burst of 10,000 then
    ran ten times slower. The claim finds its rows by id, with no such join."""
    from pgpubsub._claim_sql import CLAIM_SQL, EVERY_SEGMENT, claim_on

    durable.migrate(dsn)

    @dataclass
    class Burst(Channel, lock_notifications=True):
        n: int

    name = spec_of(Burst).name
    with psycopg.connect(dsn) as conn:
        pgpubsub.notify_many(Burst, [{"n": i} for i in range(1000)], conn=conn)
    admin_query(dsn, "DELETE FROM pgpubsub.message")
    admin_query(dsn, "ANALYZE pgpubsub.message")  # it saw an empty queue
    with psycopg.connect(dsn) as conn:
        pgpubsub.notify_many(Burst, [{"n": i} for i in range(1000)], conn=conn)
    params = {
        "channel": name, "limit": 500, "max": 5, "base": 1.0, "factor": 2.0, "cap": 300.0,
        "holder": "test#0", "ttl": 10.0, "after": "", "per_key": 125, "blocked": [],
        "suspect": None, "passed": [],
    }  # fmt: skip
    with psycopg.connect(dsn) as conn:
        claim = claim_on(CLAIM_SQL, EVERY_SEGMENT)
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN ANALYZE " + claim, params))
    assert "rows=500" in plan  # it claimed a batch
    assert "Rows Removed by Join Filter" not in plan, plan


def _ready_for_query(session: PsycopgSession, run: Any) -> int:
    """How many round trips ``run()`` took on ``session``'s connection (ReadyForQuery
    messages in libpq's trace of it)."""
    import tempfile

    assert session.conn is not None
    with tempfile.TemporaryFile("w+") as trace:
        session.conn.pgconn.trace(trace.fileno())
        try:
            run()
        finally:
            session.conn.pgconn.untrace()
        trace.seek(0)
        return sum(1 for line in trace if "ReadyForQuery" in line)


def test_a_session_transaction_sends_its_begin_with_its_first_statement(db: str) -> None:
    """Issue 26: psycopg sent a transaction's BEGIN and waited for it, a round trip more
    for every claim, batch and question of a worker (about 6 round trips a message at
    400 messages/s became 4). Invariant: a transaction costs a round trip per wait for
    results and one for its COMMIT, none for its BEGIN; statements run together cost
    one in all; a block that runs nothing costs none."""
    session = PsycopgSession(db)
    session.open()
    try:

        def one_statement() -> None:
            with session.atomic():
                assert session.execute("SELECT 1") == [(1,)]

        def nothing() -> None:
            with session.atomic():
                pass

        assert _ready_for_query(session, one_statement) == 2
        assert _ready_for_query(session, nothing) == 0
        both = [("SELECT 1", ()), ("SELECT 2", ())]
        assert _ready_for_query(session, lambda: session.together(both)) == 1
        assert session.together(both) == [[(1,)], [(2,)]]
    finally:
        session.close()


def test_statements_run_together_are_undone_whole_when_one_fails(db: str) -> None:
    """Statements run together go with their COMMIT in one round trip: when one fails,
    the COMMIT is skipped, and the transaction, aborted, is rolled back. Invariant:
    nothing of it stays, the error raises, and the session goes on."""
    admin_query(db, "CREATE TABLE IF NOT EXISTS together_t (n int)")
    admin_query(db, "TRUNCATE together_t")
    session = PsycopgSession(db)
    session.open()
    try:
        with pytest.raises(psycopg.errors.DivisionByZero):
            session.together([("INSERT INTO together_t VALUES (1)", ()), ("SELECT 1/0", ())])
        assert not session.in_transaction()
        assert session.together([("INSERT INTO together_t VALUES (2)", ()), ("SELECT 1", ())])
        assert admin_query(db, "SELECT n FROM together_t") == [(2,)]
    finally:
        session.close()
        admin_query(db, "DROP TABLE together_t")


@pytest.fixture
def session_table(db: str) -> Iterator[PsycopgSession]:
    """A PsycopgSession open on ``db``, and an empty table ``session_t (n int)``."""
    admin_query(db, "CREATE TABLE IF NOT EXISTS session_t (n int)")
    admin_query(db, "TRUNCATE session_t")
    session = PsycopgSession(db)
    session.open()
    yield session
    session.close()
    admin_query(db, "DROP TABLE session_t")


def test_a_statement_failing_in_a_pipeline_inside_a_transaction_raises_its_own_error(
    db: str, session_table: PsycopgSession
) -> None:
    """Hostile review 25, finding 2: a statement that failed in a pipeline opened inside
    an atomic() block raised psycopg's ProgrammingError (the pipeline rolled back a
    transaction the block still held) instead of its own error. Invariant: the error
    is the statement's, the block is undone, the session goes on."""
    session = session_table
    with pytest.raises(psycopg.errors.DivisionByZero):
        with session.atomic(), session.pipeline():
            session.execute("INSERT INTO session_t VALUES (1)")
            session.execute("SELECT 1/0")
    assert not session.in_transaction()
    assert session.execute("SELECT 1") == [(1,)]
    assert admin_query(db, "SELECT n FROM session_t") == []


def test_statements_run_together_in_a_pipeline_leave_no_failed_transaction(
    db: str, session_table: PsycopgSession
) -> None:
    """Hostile review 25, finding 1: statements run together inside an open pipeline,
    one failing and the error caught there, left the session in the failed
    transaction: every later statement failed. Invariant: as outside a pipeline, the
    transaction is undone whole and the next statement runs."""
    session = session_table
    with session.pipeline():
        with pytest.raises(psycopg.errors.DivisionByZero):
            session.together([("INSERT INTO session_t VALUES (1)", ()), ("SELECT 1/0", ())])
        session.execute("INSERT INTO session_t VALUES (2)")
    assert not session.in_transaction()
    assert admin_query(db, "SELECT n FROM session_t") == [(2,)]


def test_a_sessions_statements_run_read_committed_on_a_serializable_database(db: str) -> None:
    """A statement run alone has no BEGIN to name its isolation: on a database whose
    default is serializable it would run serializable (and fail where two workers
    meet). Invariant: whatever the database's default, every transaction of a session,
    alone or in a block, runs read committed."""
    dbname = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
    admin_query(db, f"ALTER DATABASE {dbname} SET default_transaction_isolation = 'serializable'")
    session = PsycopgSession(db)
    try:
        session.open()
        show = ("SHOW transaction_isolation", ())
        assert session.together([show]) == [[("read committed",)]]
        assert session.together([show, show])[1] == [("read committed",)]
        with session.atomic():
            assert session.execute(*show) == [("read committed",)]
    finally:
        session.close()
        admin_query(db, f"ALTER DATABASE {dbname} RESET default_transaction_isolation")
