"""No listener runs again for a neighbour's failure, whatever the listener does with its
connection: transaction blocks (and errors caught in them), row counts, prepared statements
over many batches. Found by the hostile review of the journal (issue 23, item 10)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest
from helpers import admin_query
from psycopg.types.json import Jsonb
from test_failure_isolation import Batch, effects, processor, publish, rows

import pgpubsub
from pgpubsub import durable
from pgpubsub.listen import Registry


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    durable.migrate(dsn)
    admin_query(dsn, "CREATE TABLE effects (kind text, n int, pid int)")
    yield dsn


def insert_if_new(n: int) -> None:
    """A listener's "insert if new": a duplicate caught in a savepoint; message 5 raises."""
    conn = durable.connection()
    try:
        with conn.transaction():
            conn.execute("INSERT INTO once VALUES (%s)", (n,))
    except psycopg.errors.UniqueViolation:
        pass
    conn.execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
    if n == 5:
        raise RuntimeError("flaky")


def test_a_failure_in_a_warm_processor_runs_every_neighbour_again(db: str) -> None:
    """A processor that has run several batches (psycopg prepares statements after 5
    runs): a failure undoes its message alone; no prepared statement the driver believes in
    is missing on the server, so the batch does not fail as a whole."""
    registry = Registry()
    calls: Counter[int] = Counter()

    def listener(n: int) -> None:
        calls[n] += 1
        durable.connection().execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        if n == 4:
            raise RuntimeError("flaky")

    registry.add(Batch, listener)
    proc = processor(db, registry)
    for b in range(6):  # a worker that has run a few batches, as in production
        publish(db, Batch, range(100 + 10 * b, 105 + 10 * b))
        proc.drain_once()
    publish(db, Batch, range(10))
    proc.drain_once()
    proc.session.close()
    assert {n: k for n, k in calls.items() if k != 1} == {}
    assert set(rows(db)) == {4}


def test_a_listener_that_caught_its_own_error_in_a_savepoint_is_charged_for_a_neighbour(
    db: str,
) -> None:
    """ "Insert if new": the listener wraps a write that may be a duplicate in
    conn.transaction() and goes on when it is. Message 2 does so and completes. Message 5
    raises; the rewind re-sends message 2's statements without the savepoint (psycopg
    sends SAVEPOINT/ROLLBACK TO outside the journal's cursors), the duplicate fails, and
    message 2 is charged a failure (UniqueViolation) it never had, to be run again."""
    admin_query(db, "CREATE TABLE once (n int UNIQUE)")
    admin_query(db, "INSERT INTO once VALUES (2)")
    registry = Registry()
    calls: Counter[int] = Counter()

    def listener(n: int) -> None:
        calls[n] += 1
        insert_if_new(n)

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(100, 110))  # warm-up batch
    proc.drain_once()
    publish(db, Batch, range(10))
    proc.drain_once()
    proc.session.close()
    assert set(rows(db)) == {5}, {n: r[:2] for n, r in rows(db).items()}
    assert effects(db) == {n: 1 for n in [*range(10), *range(100, 110)] if n != 5}
    assert (proc.processed, proc.failed) == (19, 1)


def test_a_caught_error_in_a_savepoint_keeps_its_key_in_order(db: str) -> None:
    """key 'a' is messages 0, 2, 4. Message 0 completes (its
    duplicate caught in a savepoint), message 2 of 'a' runs once 0 is confirmed, then
    message 5 (key 'b') raises; the rewind fails message 0, while message 2 and 4 of the
    same key complete before it."""
    admin_query(db, "CREATE TABLE once (n int UNIQUE)")
    admin_query(db, "INSERT INTO once VALUES (0)")
    registry = Registry()

    def listener(n: int) -> None:
        insert_if_new(n)

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(100, 110))
    proc.drain_once()
    with psycopg.connect(db) as conn:
        for n in range(6):
            pgpubsub.notify(Batch(n=n), conn=conn, ordering_key="ab"[n % 2])
    proc.drain_once()
    proc.session.close()
    stored = rows(db)
    state = {n: stored[n][0] if n in stored else "done" for n in range(6)}  # done rows go
    # A later message of key 'a' is never done while an earlier one of 'a' is not.
    assert not (state[0] != "done" and state[2] == "done"), state
    assert set(stored) == {5}, {n: r[:2] for n, r in stored.items()}


def test_a_listener_with_a_transaction_block_runs_again_for_a_neighbours_late_error(
    db: str,
) -> None:
    """message 2's write is a duplicate (its error surfaces late, in the pipeline); message 3's
    listener uses conn.transaction(): the late error surfaces there, message 3 is given
    back and its listener runs again."""
    admin_query(db, "CREATE TABLE once (n int UNIQUE)")
    admin_query(db, "INSERT INTO once VALUES (2)")
    registry = Registry()
    calls: Counter[int] = Counter()

    def listener(n: int) -> None:
        calls[n] += 1
        conn = durable.connection()
        if n == 3:
            with conn.transaction():
                conn.execute("INSERT INTO once VALUES (%s)", (n,))
        else:
            conn.execute("INSERT INTO once VALUES (%s)", (n,))

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(100, 110))
    proc.drain_once()
    publish(db, Batch, range(6))
    proc.drain_once()
    proc.drain_once()
    proc.session.close()
    assert calls[3] == 1, dict(calls)


def test_a_stale_prepared_statement_fails_an_innocent_message_of_a_later_batch(db: str) -> None:
    """After a batch in which a message failed, the next batch's innocent messages all
    complete: nothing the failure left behind (prepared statements) fails them."""
    registry = Registry()
    calls: Counter[int] = Counter()

    def listener(n: int) -> None:
        calls[n] += 1
        conn = durable.connection()
        with conn.transaction():
            conn.execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        if n == 4:
            raise RuntimeError("flaky")

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(100, 110))  # the INSERT is prepared (6th run on)
    proc.drain_once()
    publish(db, Batch, range(10))  # message 4 raises: its writes are undone
    proc.drain_once()
    publish(db, Batch, range(200, 210))  # all innocent
    proc.drain_once()
    proc.session.close()
    stored = rows(db)
    assert set(stored) == {4}, {n: (r[:2], r[2].splitlines()[-1]) for n, r in stored.items()}
    assert (proc.processed, proc.failed) == (29, 1)


def test_a_listener_reads_the_row_count_of_its_own_statement(db: str) -> None:
    """``cursor.rowcount`` in a listener is the count of its statement (it was -1: the
    statement was pipelined and never waited for)."""
    admin_query(db, "CREATE TABLE counters (k int PRIMARY KEY, v int)")
    admin_query(db, "INSERT INTO counters SELECT k, 0 FROM generate_series(0, 9, 2) k")
    registry = Registry()
    seen: dict[int, int] = {}

    def listener(n: int) -> None:
        cur = durable.connection().execute("UPDATE counters SET v = v + 1 WHERE k = %s", (n,))
        seen[n] = cur.rowcount

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(10))
    proc.drain_once()
    publish(db, Batch, range(10))  # a second batch: the processor is warm
    proc.drain_once()
    proc.session.close()
    assert seen == {n: 1 - n % 2 for n in range(10)}


def test_executemany_returning_of_a_failed_listener_is_undone(db: str) -> None:
    registry = Registry()

    def listener(n: int) -> None:
        cur = durable.connection().cursor()
        cur.executemany(
            "INSERT INTO effects VALUES ('job', %s, 0) RETURNING n", [(n,)], returning=True
        )
        if n == 4:
            raise RuntimeError("flaky")

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(10))
    proc.drain_once()
    proc.session.close()
    assert set(rows(db)) == {4}
    assert effects(db) == {n: 1 for n in range(10) if n != 4}


def test_statements_are_sent_again_with_their_parameters_as_they_were(db: str) -> None:
    registry = Registry()

    def listener(n: int) -> None:
        conn = durable.connection()
        doc = {"n": n, "step": 1}
        conn.execute("INSERT INTO effects VALUES (%s::jsonb->>'step', %s, 0)", (Jsonb(doc), n))
        doc["step"] = 2
        if n == 4:
            raise RuntimeError("flaky")

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(10))
    proc.drain_once()
    proc.session.close()
    kinds = Counter(r[0] for r in admin_query(db, "SELECT kind FROM effects"))
    assert kinds == {"1": 9}, kinds


def test_executemany_rowcount_is_the_sum_of_its_statements(db: str) -> None:
    admin_query(db, "CREATE TABLE counters (k int PRIMARY KEY, v int)")
    admin_query(db, "INSERT INTO counters SELECT k, 0 FROM generate_series(0, 20) k")
    registry = Registry()
    seen: dict[int, int] = {}

    def listener(n: int) -> None:
        cur = durable.connection().cursor()
        cur.executemany("UPDATE counters SET v = v + 1 WHERE k = %s", [(n,), (n + 1,)])
        seen[n] = cur.rowcount

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(5))
    proc.drain_once()
    proc.session.close()
    assert seen == {n: 2 for n in range(5)}


def test_statusmessage_and_description_wait_for_their_statement(db: str) -> None:
    registry = Registry()
    seen: dict[int, object] = {}

    def listener(n: int) -> None:
        conn = durable.connection()
        cur = conn.execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        msg = cur.statusmessage
        cur2 = conn.execute("SELECT %s::int AS n", (n,))
        desc = [d.name for d in cur2.description] if cur2.description else None
        seen[n] = (msg, desc)

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(3))
    proc.drain_once()
    proc.session.close()
    assert seen == {n: ("INSERT 0 1", ["n"]) for n in range(3)}


def test_an_error_caught_in_a_block_of_two_statements_is_not_charged(db: str) -> None:
    admin_query(db, "CREATE TABLE once (n int UNIQUE)")
    admin_query(db, "INSERT INTO once VALUES (2)")
    registry = Registry()
    calls: Counter[int] = Counter()

    def listener(n: int) -> None:
        calls[n] += 1
        conn = durable.connection()
        try:
            with conn.transaction():
                conn.execute("INSERT INTO once VALUES (%s)", (n,))
                time.sleep(0.05)  # the INSERT's error has arrived
                conn.execute("INSERT INTO effects VALUES ('side', %s, 0)", (n,))
        except psycopg.errors.UniqueViolation:
            pass
        conn.execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(5))
    proc.drain_once()
    for _ in range(3):  # its retries, made due now
        admin_query(db, "UPDATE pgpubsub.message SET run_at = now()")
        proc.drain_once()
    proc.session.close()
    assert {n: r[:2] for n, r in rows(db).items()} == {}
    assert dict(calls) == {n: 1 for n in range(5)}


def test_every_failure_of_a_processors_life_leaves_its_prepared_statements_true(
    db: str,
) -> None:
    """The intermittent "prepared statement _pg3_N does not exist" of chaos and stress
    runs. After a rewind the journal sent DEALLOCATE ALL, and psycopg looks at a statement's
    result (to forget its own record of prepared statements) only the first time it sees
    its text: a processor whose first failure came before anything was prepared had its
    statements deallocated by the second one behind psycopg's back, and its next claim
    failed. Invariant: whatever failures came before, in whatever order, every statement
    psycopg believes prepared exists on the server. Failures in the first batch of a fresh
    connection, then after warm batches, twice."""
    registry = Registry()
    calls: Counter[int] = Counter()

    def listener(n: int) -> None:
        calls[n] += 1
        durable.connection().execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        if n % 100 == 4:
            raise RuntimeError("flaky")

    registry.add(Batch, listener)
    proc = processor(db, registry)
    try:
        for b in range(12):  # failures in batches 0, 6 and 11; claims prepared from the 6th
            first = 100 * b
            publish(db, Batch, range(first, first + (10 if b in (0, 6, 11) else 3)))
            proc.drain_once()
            conn = proc.session.connection
            prepared = {r[0] for r in conn.execute("SELECT name FROM pg_prepared_statements")}
            conn.commit()  # (a rollback would make psycopg forget its prepared statements)
            believed = {n.decode() for n in conn._prepared._names.values()}
            assert believed <= prepared, (b, believed - prepared)
    finally:
        proc.session.close()
    assert {n: k for n, k in calls.items() if k != 1} == {}
    assert set(rows(db)) == {4, 604, 1104}


def test_a_caught_error_is_the_one_recorded_when_the_listener_goes_on_and_fails(db: str) -> None:
    """Review of issue 26 (round 3c), finding 5: a listener caught the error of its own
    statement (read at once) and went on; its next statement (a transaction block) failed
    because the transaction was aborted, and that consequence was recorded as the
    message's failure instead of its cause. Its neighbours complete, none runs twice."""
    registry = Registry()
    calls: Counter[int] = Counter()

    def listener(n: int) -> None:
        calls[n] += 1
        conn = durable.connection()
        if n == 1:
            try:
                conn.execute("SELECT 1/0").fetchall()
            except psycopg.errors.DivisionByZero:
                pass
        with conn.transaction():
            conn.execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(3))
    proc.drain_once()
    proc.session.close()
    assert dict(calls) == {0: 1, 1: 1, 2: 1}
    stored = rows(db)
    assert set(stored) == {1}
    assert "DivisionByZero" in stored[1][2] or "division by zero" in stored[1][2], stored[1][2]
