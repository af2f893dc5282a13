"""Ordering keys and max_in_flight under the interleavings production makes.

Listeners record when they start and end; a gate holds one in flight while
the test does what users and failures do (replay, a concurrent publisher, a
killed session). The invariants: per ordering key at most one message in a
listener at any moment, in the order their publishers committed; never more
than ``max_in_flight`` listeners of a channel at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from helpers import Running, admin_query, terminate_sessions, wait_until
from test_failure_isolation import Batch, processor, rows

import pgpubsub
from pgpubsub import durable, messages
from pgpubsub._leases import new_owner
from pgpubsub._processor import ChannelProcessor
from pgpubsub.channel import Channel, spec_of
from pgpubsub.durable import migrate
from pgpubsub.listen import Registry
from pgpubsub.session import PsycopgSession


@dataclass
class Keyed(Channel, lock_notifications=True, concurrency=3, max_attempts=1, retry_delay=0.05):
    seq: int
    action: str = "ok"


@dataclass
class OneAtATime(Channel, lock_notifications=True, concurrency=2, max_in_flight=1):
    seq: int


class Recorder:
    """Start and end of every listener call; a gate per seq holds one in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[int, float, float | None]] = []
        self.gates: dict[int, threading.Event] = {}

    def gate(self, seq: int) -> threading.Event:
        return self.gates.setdefault(seq, threading.Event())

    def __call__(self, seq: int, action: str = "ok") -> None:
        with self.lock:
            index = len(self.spans)
            self.spans.append((seq, time.monotonic(), None))
        try:
            if seq in self.gates:
                assert self.gates[seq].wait(30)
            if action == "fail":
                raise RuntimeError("fails")
        finally:
            with self.lock:
                self.spans[index] = (seq, self.spans[index][1], time.monotonic())

    def started(self, seq: int) -> bool:
        with self.lock:
            return any(s == seq for s, _, _ in self.spans)

    def overlaps(self) -> list[tuple[int, int]]:
        with self.lock:
            spans = [(s, a, b if b is not None else float("inf")) for s, a, b in self.spans]
        return [
            (s1, s2)
            for i, (s1, a1, b1) in enumerate(spans)
            for s2, a2, b2 in spans[i + 1 :]
            if a1 < b2 and a2 < b1
        ]

    def order(self) -> list[int]:
        with self.lock:
            return [s for s, _, _ in sorted(self.spans, key=lambda span: span[1])]


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    migrate(dsn)
    yield dsn


def status(dsn: str, message_id: int) -> object:
    rows = admin_query(dsn, "SELECT status FROM pgpubsub.message WHERE id = %s", (message_id,))
    return rows[0][0] if rows else None


def publish(dsn: str, seq: int, action: str = "ok", **options: object) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        message = Keyed(seq=seq, action=action)
        return pgpubsub.notify(message, conn=conn, ordering_key="k", **options)


def test_a_replayed_message_of_a_key_waits_for_the_one_in_a_listener(db: str) -> None:
    recorder = Recorder()
    registry = Registry()
    registry.add(Keyed, recorder)
    workers = [Running(db, registry), Running(db, registry)]
    try:
        dead = publish(db, 1, "fail")
        wait_until(lambda: status(db, dead) == "dead", timeout=10)
        recorder.gate(2)
        publish(db, 2)
        wait_until(lambda: recorder.started(2), timeout=10)
        with psycopg.connect(db) as conn:
            assert list(messages.replay(conn, ids=[dead]).replayed) == [dead]
        time.sleep(1.5)  # time for any worker to take the replayed message, if it could
        assert [s for s in recorder.order() if s == 1] == [1]  # only its first, failed run
        recorder.gate(2).set()
        wait_until(lambda: recorder.order().count(1) == 2, timeout=10)
    finally:
        for worker in workers:
            worker.stop()
    assert recorder.overlaps() == []


def test_one_keys_messages_run_in_the_order_their_publishers_committed(db: str) -> None:
    recorder = Recorder()
    registry = Registry()
    registry.add(Keyed, recorder)
    worker = Running(db, registry)
    committed: list[int] = []
    try:
        recorder.gate(2)
        first = psycopg.connect(db)
        pgpubsub.notify(Keyed(seq=1), conn=first, ordering_key="k")  # lower id, not committed

        def second() -> None:
            publish(db, 2)
            committed.append(2)

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(1.0)  # the second publisher commits now, or waits for the first
        committed.append(1)  # before the call returns: the second may commit at once after it
        first.commit()
        first.close()
        time.sleep(1.0)
        recorder.gate(2).set()
        thread.join(10)
        wait_until(lambda: sorted(recorder.order()) == [1, 2], timeout=10)
    finally:
        worker.stop()
    assert recorder.overlaps() == []
    assert recorder.order() == committed


def test_max_in_flight_holds_when_the_holders_session_dies(db: str) -> None:
    recorder = Recorder()
    registry = Registry()
    registry.add(OneAtATime, lambda seq: recorder(seq))
    workers = [Running(db, registry), Running(db, registry)]
    try:
        recorder.gate(1)
        with psycopg.connect(db, autocommit=True) as conn:
            pgpubsub.notify(OneAtATime(seq=1), conn=conn)
            wait_until(lambda: recorder.started(1), timeout=10)
            pgpubsub.notify(OneAtATime(seq=2), conn=conn)
            # Every worker session dies: a failover, a proxy, an idle timeout.
            terminate_sessions(db)
        time.sleep(3)  # the workers reconnect; the listener of 1 is still running
        assert not recorder.started(2), "a second listener ran under max_in_flight=1"
        recorder.gate(1).set()
        wait_until(lambda: recorder.started(2), timeout=60)
    finally:
        for worker in workers:
            worker.stop()
    assert recorder.overlaps() == []
    assert spec_of(OneAtATime).cls.max_in_flight == 1


def test_a_later_commit_runs_later_even_when_its_key_waited_meanwhile(db: str) -> None:
    """Both messages pending when the key frees up: the one committed first runs first."""
    recorder = Recorder()
    registry = Registry()
    registry.add(Keyed, recorder)
    worker = Running(db, registry)
    committed: list[int] = []
    try:
        recorder.gate(0)
        publish(db, 0)  # holds the key while the two publishers race
        wait_until(lambda: recorder.started(0), timeout=10)
        first = psycopg.connect(db)
        pgpubsub.notify(Keyed(seq=1), conn=first, ordering_key="k")  # not committed yet

        def second() -> None:
            publish(db, 2)
            committed.append(2)

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(1.0)  # the second publisher commits now, or waits for the first
        committed.append(1)  # before the call returns: the second may commit at once after it
        first.commit()
        first.close()
        thread.join(10)
        recorder.gate(0).set()
        wait_until(lambda: sorted(recorder.order()) == [0, 1, 2], timeout=10)
    finally:
        worker.stop()
    assert recorder.overlaps() == []
    assert recorder.order() == [0, *committed]


def claimer(dsn: str, claim_size: int) -> ChannelProcessor:
    spec = spec_of(Keyed)
    proc = ChannelProcessor(PsycopgSession(dsn), spec, [], holder=f"{new_owner()}#0")
    proc.session.open()
    proc.claim_size = claim_size
    return proc


def publish_keys(dsn: str, keys: int, per_key: int) -> None:
    with psycopg.connect(dsn) as conn:
        for k in range(keys):
            pgpubsub.notify_many(
                Keyed, [{"seq": k * 100 + i} for i in range(per_key)], conn=conn,
                ordering_key=f"k{k:02d}",
            )  # fmt: skip


def test_two_claims_at_once_take_different_keys_and_both_fill_their_batches(db: str) -> None:
    """A key another claim is taking (locked, its lease not committed) is passed over."""
    publish_keys(db, keys=20, per_key=2)
    first, second = claimer(db, 10), claimer(db, 10)
    try:
        with first.session.atomic():  # the first claim is not committed yet
            taken = first._claim()
            got = second._claim()
        assert len(taken) == len(got) == 10
        assert not {r[8] for r in taken} & {r[8] for r in got}, "a key claimed twice"
        # Each a key's messages in order, from its oldest (seq = key * 100 + i).
        for rows in (taken, got):
            seqs: dict[str, list[int]] = {}
            for row in sorted(rows):
                seqs.setdefault(row[8], []).append(json.loads(row[1])["seq"] % 100)
            assert all(s == list(range(len(s))) for s in seqs.values()), seqs
        leases = admin_query(db, "SELECT name, holder FROM pgpubsub.lease WHERE kind = 'key'")
        holders = dict(leases)  # type: ignore[arg-type]
        assert len(leases) == len(holders) == 10
        assert {r[8] for r in taken} | {r[8] for r in got} == set(holders)
    finally:
        first.session.close()
        second.session.close()


def test_a_claim_stops_a_key_at_a_message_it_may_not_run_yet(db: str) -> None:
    """A key's messages are claimed from its oldest up to one locked elsewhere or unfinished.

    Unfinished (its worker stopped during its batch): only as a key's oldest,
    and then claimed alone.
    """
    publish_keys(db, keys=3, per_key=4)
    ids = {
        (str(k), int(s)): int(i)  # type: ignore[call-overload]
        for i, k, s in admin_query(
            db, "SELECT id, ordering_key, (payload::json->>'seq')::int %% 100 FROM pgpubsub.message"
        )
    }
    admin_query(db, "UPDATE pgpubsub.message SET unfinished = true WHERE id = %s", (ids["k01", 2],))
    proc = claimer(db, 40)
    try:
        with psycopg.connect(db) as other:  # another transaction holds k00's third message
            lock = "SELECT 1 FROM pgpubsub.message WHERE id = %s FOR UPDATE"
            other.execute(lock, (ids["k00", 2],))
            rows = proc._claim()
        claimed = sorted((r[8], r[0]) for r in rows)
        assert claimed == sorted(
            [("k00", ids["k00", 0]), ("k00", ids["k00", 1])]
            + [("k01", ids["k01", 0]), ("k01", ids["k01", 1])]
            + [("k02", ids["k02", i]) for i in range(4)]
        )
        assert not any(r[7] for r in rows)  # none alone
        proc._release(wake=False)
        admin_query(db, "DELETE FROM pgpubsub.message WHERE id = ANY(%s)", ([r[0] for r in rows],))
        # k01's oldest is now the unfinished one: the claim leaves it and its key, and
        # says so; then it is claimed alone
        rows = proc._claim()
        assert sorted(r[0] for r in rows) == [ids["k00", 2], ids["k00", 3]]
        assert proc._suspect == (ids["k01", 2], "k01")
        proc._release(wake=False)
        rows = proc._claim(ids["k01", 2])
        assert [(r[0], r[7]) for r in rows] == [(ids["k01", 2], True)]
    finally:
        proc.session.close()


# -- found by the hostile review of issue 24 --------------------------------------------


def test_a_later_message_of_a_key_never_completes_before_an_earlier_one_fails(
    db: str,
) -> None:
    """Key 'a' is messages 0 and 1, key 'b' message 2, one batch. Message 0's write
    depends on a row another transaction may change (a balance, a stock count, a flag):
    it holds when sent, so message 1 of 'a' runs and completes. Message 2 raises; the
    rewind sends message 0's statement again, now after the other transaction's commit,
    and it fails: message 0 is retried later while message 1 of its key is done."""
    admin_query(db, "CREATE TABLE effects (kind text, n int, pid int)")
    admin_query(db, "CREATE TABLE flag (n int)")
    admin_query(db, "INSERT INTO flag VALUES (1)")
    registry = Registry()

    def listener(n: int) -> None:
        conn = durable.connection()
        if n == 0:
            conn.execute(
                "INSERT INTO effects SELECT 'job', %s, 1 / (SELECT n FROM flag)", (n,)
            )
        else:
            conn.execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        if n == 2:
            # another client commits meanwhile (here, for a deterministic interleaving)
            admin_query(db, "UPDATE flag SET n = 0")
            raise RuntimeError("flaky")

    registry.add(Batch, listener)
    proc = processor(db, registry)
    with psycopg.connect(db) as conn:
        for n, key in ((0, "a"), (1, "a"), (2, "b")):
            pgpubsub.notify(Batch(n=n), conn=conn, ordering_key=key)
    proc.drain_once()
    proc.session.close()
    stored = rows(db)
    state = {n: stored[n][0] if n in stored else "done" for n in range(3)}
    # A later message of key 'a' is never done while an earlier one of 'a' is not.
    assert not (state[0] != "done" and state[1] == "done"), (state, stored)


# Timing of the library's own threads (no SQL of the server's version): PostgreSQL 18 only in CI.
@pytest.mark.acceptance
def test_max_in_flight_holds_after_a_stop_that_leaves_its_listener_running(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker.stop(timeout) in a process that goes on (not ``exiting``): the durable guide
    and the docstring say the listener goes on in its thread and its batch commits when
    it returns. The stop also stops the lease keeper, so the max_in_flight slot that
    listener holds runs out TTL seconds later and another worker takes it: two listeners
    run under max_in_flight=1."""

    from pgpubsub import _leases

    monkeypatch.setattr(_leases, "TTL", 2.0)  # leases of 2 s: the wait below is 4 s, not 20
    recorder = Recorder()
    registry = Registry()
    registry.add(OneAtATime, lambda seq: recorder(seq))
    first = Running(db, registry)
    second: Running | None = None
    try:
        recorder.gate(1)
        with psycopg.connect(db, autocommit=True) as conn:
            pgpubsub.notify(OneAtATime(seq=1), conn=conn)
        wait_until(lambda: recorder.started(1), timeout=10)
        # The first worker is stopped with a short grace; its listener still runs.
        first.loop.run(first.worker.stop(timeout=0.5), timeout=15)
        second = Running(db, registry)
        with psycopg.connect(db, autocommit=True) as conn:
            pgpubsub.notify(OneAtATime(seq=2), conn=conn)
        deadline = time.monotonic() + 2 * _leases.TTL
        while time.monotonic() < deadline and not recorder.started(2):
            time.sleep(0.1)
        assert not recorder.started(2), "a second listener ran under max_in_flight=1"
    finally:
        recorder.gate(1).set()
        if second is not None:
            second.stop()
        first.loop.close()
    assert recorder.overlaps() == []


def test_a_keyed_message_of_higher_priority_runs_before_an_unkeyed_one_of_lower(db: str) -> None:
    """The durable guide: "priority: among due messages, higher first". Both due, one
    batch: the keyed message of priority 10 runs after the unkeyed one of priority 0
    (_batch sorts every keyed message after every unkeyed one; the claim's keyed part
    ignores priority altogether)."""
    registry = Registry()
    order: list[int] = []
    registry.add(Batch, lambda n: order.append(n))
    proc = processor(db, registry)
    with psycopg.connect(db) as conn:
        pgpubsub.notify(Batch(n=0), conn=conn, priority=0)
        pgpubsub.notify(Batch(n=1), conn=conn, priority=10, ordering_key="a")
    proc.drain_once()
    proc.session.close()
    assert order == [1, 0]
