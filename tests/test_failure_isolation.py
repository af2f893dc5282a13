"""A failure costs only the message that caused it (durable channels).

A worker process killed by one message, an exception whose text PostgreSQL
cannot store, a write that fails only at COMMIT, a neighbour's failure: each is
charged to its own message; the rest of the batch completes exactly once, no
listener runs again for another message's failure, counters count what
committed. Also: delays count from the call, and idle processors do not spin.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import admin_query, most_at_once, wait_until

import pgpubsub
from pgpubsub import _processor, durable
from pgpubsub._claim_sql import CLAIM_SQL, claim_template
from pgpubsub._flow_sql import NEXT_DUE_SQL
from pgpubsub._leases import TAKE_SLOT_SQL
from pgpubsub._processor import ChannelProcessor
from pgpubsub.channel import Channel, spec_of
from pgpubsub.listen import Registry
from pgpubsub.session import PsycopgSession

TESTS = Path(__file__).parent


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    durable.migrate(dsn)
    admin_query(dsn, "CREATE TABLE effects (kind text, n int, pid int)")
    yield dsn


def effects(dsn: str) -> dict[int, int]:
    return dict(admin_query(dsn, "SELECT n, count(*) FROM effects GROUP BY n"))  # type: ignore[arg-type]


@dataclass
class Batch(Channel, lock_notifications=True, max_attempts=3, retry_delay=5):
    n: int


def publish(dsn: str, channel: Any, ns: range) -> None:
    with psycopg.connect(dsn) as conn:
        pgpubsub.notify_many(channel, [{"n": n} for n in ns], conn=conn)


def processor(dsn: str, registry: Registry, channel: Any = Batch, **opts: Any) -> ChannelProcessor:
    spec = spec_of(channel)
    proc = ChannelProcessor(PsycopgSession(dsn), spec, registry.listeners(spec), **opts)
    proc.session.open()
    return proc


def rows(dsn: str) -> dict[int, tuple[Any, ...]]:
    """n -> (status, attempts, last_error) of every stored message."""
    found = admin_query(
        dsn, "SELECT (payload::json->>'n')::int, status, attempts, last_error FROM pgpubsub.message"
    )
    return {r[0]: r[1:] for r in found}  # type: ignore[misc]


def as_suspects(dsn: str, attempts: int = 1) -> None:
    """Every stored message as a worker killed during its attempt ``attempts`` left it."""
    admin_query(dsn, "UPDATE pgpubsub.message SET attempts = %s, unfinished = true", (attempts,))


def session_lost_at_first_lock(dsn: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The processing session of the first batch to start is ended (its server process
    terminated) as the batch locks its rows; the list gets that backend's pid."""
    lock = ChannelProcessor._lock
    lost: list[int] = []

    def lost_first(self: ChannelProcessor, ids: list[int]) -> dict[int, int]:
        if not lost:
            lost.append(self.session.connection.info.backend_pid)
            admin_query(dsn, "SELECT pg_terminate_backend(%s)", (lost[0],))
            time.sleep(0.05)
        return lock(self, ids)

    monkeypatch.setattr(ChannelProcessor, "_lock", lost_first)
    return lost


# -- 1. a message that kills its worker ------------------------------------------------------


def keep_a_worker_running(
    cmd: list[str], env: dict[str, str], done: Any, timeout: float, left: Any
) -> int:
    """Worker processes ``cmd``, a new one as soon as the last exits (as ``pgpubsub listen
    --processes`` would, without its backoff), until ``done()``; how many died. After
    ``timeout`` seconds the test fails, saying what is ``left()``."""
    proc: subprocess.Popen[bytes] | None = None
    deaths = 0
    deadline = time.monotonic() + timeout
    try:
        while not done():
            assert time.monotonic() < deadline, (deaths, left())
            if proc is None or proc.poll() is not None:
                deaths += proc is not None
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
            time.sleep(0.02)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
    return deaths


@pytest.mark.acceptance  # worker processes
@pytest.mark.parametrize("how", ["kill", "exit"])
def test_a_message_that_kills_its_worker_is_the_only_one_charged(db: str, how: str) -> None:
    """20 messages in one batch, the 6th kills its process (SIGKILL / os._exit) every time.

    The worker process is restarted each time it dies (as the supervisor of
    ``pgpubsub listen --processes`` would, without its backoff): only that message
    ends dead; the other 19 complete, once each, charged at most one extra attempt.
    """
    from app.crash_listeners import Crashy

    publish(db, Crashy, range(20))  # before the worker starts: its first claim takes all 20
    env = {**os.environ, "PGPUBSUB_DSN": db, "PYTHONPATH": str(TESTS), "CRASH_ON": "5"}
    env["CRASH_HOW"] = how
    cmd = [sys.executable, "-m", "pgpubsub", "listen", "app.crash_listeners", "--worker"]

    def finished() -> bool:
        return sorted(r[0] for r in rows(db).values()) == ["dead"] + ["done"] * 19

    deaths = keep_a_worker_running(cmd, env, finished, 60, lambda: rows(db))
    stored = rows(db)
    assert stored[5][:2] == ("dead", 3)
    assert "stopped before it completed" in stored[5][2]
    assert deaths == 3
    for n in set(range(20)) - {5}:
        status, attempts, _ = stored[n]
        assert status == "done" and attempts <= 2, (n, stored[n])
    assert effects(db) == {n: 1 for n in range(20) if n != 5}  # the crash's writes never commit


@pytest.mark.acceptance  # worker processes
def test_a_message_that_kills_its_process_charges_no_message_of_another_channel(
    db: str,
) -> None:
    """The crashing message runs with nothing else of its process in a listener, so its
    crashes are charged to it alone, not to a slow neighbour on another channel."""
    from app.crash_listeners import Crashy, Neighbour

    publish(db, Crashy, range(6))
    publish(db, Neighbour, range(30))
    env = {**os.environ, "PGPUBSUB_DSN": db, "PYTHONPATH": str(TESTS), "CRASH_ON": "5"}
    env["CRASH_AFTER"] = "0.3"
    cmd = [sys.executable, "-m", "pgpubsub", "listen", "app.crash_listeners", "--worker"]

    def settled() -> bool:
        statuses = admin_query(db, "SELECT status FROM pgpubsub.message ORDER BY status")
        return [s for (s,) in statuses] == ["dead"] + ["done"] * 35

    left = "SELECT channel, status, attempts FROM pgpubsub.message WHERE status <> 'done'"
    keep_a_worker_running(cmd, env, settled, 90, lambda: admin_query(db, left))
    dead = admin_query(db, "SELECT channel, payload FROM pgpubsub.message WHERE status = 'dead'")
    assert len(dead) == 1 and '"n":5' in str(dead[0][1]).replace(" ", ""), dead


@pytest.mark.acceptance  # worker processes
def test_a_suspect_waiting_for_its_turn_alone_is_not_charged_with_anothers_crash(
    db: str,
) -> None:
    """Two crash suspects (their worker died during their attempt) on a channel of two
    processors: each is claimed alone, one runs while the other waits for the process to
    itself, and the one that runs kills the process again. Only it ends dead: the other
    never ran, so the crash is not its (before, it was dead without its listener ever
    running: review of issue 26)."""
    from app.crash_listeners import Suspects

    publish(db, Suspects, range(2))
    # As a worker SIGKILLed during their attempt left them.
    as_suspects(db)
    env = {**os.environ, "PGPUBSUB_DSN": db, "PYTHONPATH": str(TESTS), "CRASH_ON": "0"}
    env["CRASH_AFTER"] = "1.0"
    cmd = [sys.executable, "-m", "pgpubsub", "listen", "app.crash_listeners", "--worker"]
    cmd += ["--channels", "app.crash_listeners.Suspects"]

    def settled() -> bool:
        return {r[0] for r in rows(db).values()} <= {"dead", "done"}

    keep_a_worker_running(cmd, env, settled, 60, lambda: rows(db))
    stored = rows(db)
    # the other is charged only the attempt that ran it
    assert stored[0][:2] == ("dead", 2) and stored[1][:2] == ("done", 2), stored
    assert effects(db) == {1: 1}


def test_a_suspect_is_claimed_only_once_nothing_else_of_its_process_runs(db: str) -> None:
    """The invariant under the test above: a suspect's attempt is charged, and charged with
    its process's crash (claimed_alone), only while nothing else of the process is in a
    listener. While a batch of the process runs, the suspect waits unclaimed: a crash
    then costs it nothing (before, it waited claimed, its attempt charged: one more
    attempt lost for each crash of another message, review of issue 26). Once the batch
    is over it is claimed and marked, before its listener starts."""
    from pgpubsub._processor import GATE

    seen: list[object] = []
    registry = Registry()

    def listener(n: int) -> None:
        seen.append(admin_query(db, "SELECT attempts, claimed_alone FROM pgpubsub.message")[0])

    registry.add(Batch, listener)
    publish(db, Batch, range(1))
    as_suspects(db)
    proc = processor(db, registry)
    done: list[int] = []

    def rounds() -> None:  # as its thread would: a round, a rest (here none), a round...
        deadline = time.monotonic() + 10
        while not done and time.monotonic() < deadline:
            if proc.drain_once():
                done.append(1)
            time.sleep(0.05)

    with GATE.shared():  # a batch of another processor is in its listeners
        thread = threading.Thread(target=rounds)
        thread.start()
        time.sleep(0.6)  # the suspect seen, its processor waiting for its turn alone
        waiting = admin_query(
            db, "SELECT attempts, unfinished, claimed_alone, run_at <= now() FROM pgpubsub.message"
        )
    thread.join(10)
    proc.session.close()
    assert waiting == [(1, True, False, True)]  # uncharged, unleased: a crash now is not its
    assert seen == [(2, True)] and done == [1]


@dataclass
class Parent(Channel, lock_notifications=True, max_attempts=1):
    n: int


@dataclass
class Child(Channel, lock_notifications=True, results=True, max_attempts=1):
    n: int


def test_a_listener_waiting_for_its_processs_work_is_not_held_up_by_a_waiting_suspect(
    db: str,
) -> None:
    """A listener waits for the result of a message that another processor of its process
    handles, while a suspect waits for its turn alone: the other message's batch gets in
    (review 5 of issue 26: it waited for the suspect, which waited for the listener, until
    the listener's timeout)."""
    log: list[str] = []
    registry = Registry()

    def parent(n: int) -> None:
        time.sleep(0.6)  # the suspect is due meanwhile, and waits for its turn alone
        with psycopg.connect(db, autocommit=True) as conn:
            handle = pgpubsub.notify(Child(n=n), conn=conn)
        log.append(f"parent got {handle.result_sync(timeout=5)}")

    registry.add(Parent, parent)
    registry.add(Child, lambda n: n * 10)
    registry.add(Batch, lambda n: log.append("suspect ran"))
    publish(db, Batch, range(1))
    due_soon = "attempts = 1, unfinished = true, run_at = now() + interval '0.3 s'"
    admin_query(db, f"UPDATE pgpubsub.message SET {due_soon}")  # noqa: S608 - constant
    procs = [processor(db, registry, channel, poll_interval=0.1) for channel in (Child, Batch)]
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify(Parent(n=7), conn=conn)
    procs.append(processor(db, registry, Parent, poll_interval=0.1))
    for proc in procs:
        proc.start()
    try:
        wait_until(lambda: len(log) == 2, timeout=10)
    finally:
        for proc in procs:
            proc.stop(5)
    assert log == ["parent got 70", "suspect ran"]


@dataclass
class Suspicious(Channel, lock_notifications=True, concurrency=3, retry_delay=0.05):
    n: int


def test_a_channels_suspects_hold_up_no_other_channel_of_the_process(db: str) -> None:
    """Ten suspects of a channel of three processors run alone one after another: a
    message of another channel published meanwhile runs between two of them, not after
    them all (review 5 of issue 26: one of the processors was always waiting for its
    turn alone, and let no batch in)."""
    from pgpubsub._crew import Crew

    suspects: list[float] = []
    other: list[float] = []
    registry = Registry()

    def suspect(n: int) -> None:
        suspects.append(time.monotonic())
        time.sleep(0.1)

    registry.add(Suspicious, suspect)
    registry.add(Batch, lambda n: other.append(time.monotonic()))
    publish(db, Suspicious, range(10))
    as_suspects(db)
    crew = Crew()
    procs = [processor(db, registry, Suspicious, poll_interval=0.2) for _ in range(3)]
    for proc in procs:
        proc.crew = crew
    procs.append(processor(db, registry, Batch, poll_interval=0.2))
    for proc in procs:
        proc.start()
    try:
        wait_until(lambda: len(suspects) >= 2, timeout=10)
        published = time.monotonic()
        publish(db, Batch, range(1))
        wait_until(lambda: len(suspects) == 10 and other, timeout=10)
    finally:
        for proc in procs:
            proc.stop(5)
    assert published < other[0] < suspects[-1], (other[0] - published, suspects[-1] - published)


def test_a_processor_stopped_while_it_waits_for_its_turn_alone_claims_nothing(db: str) -> None:
    """A stop that comes while a processor waits for its turn alone (a batch of the process
    runs) ends its round: it claims no new batch once the turn comes (review 5 of issue
    26: it claimed and ran what was published meanwhile)."""
    from pgpubsub._processor import GATE

    ran: list[int] = []
    registry = Registry()
    registry.add(Batch, lambda n: ran.append(n))
    publish(db, Batch, range(1))
    as_suspects(db)
    proc = processor(db, registry)
    with GATE.shared():  # a batch of another processor of the process is in its listeners
        thread = threading.Thread(target=proc.drain_once)
        thread.start()
        time.sleep(0.5)  # the suspect seen: waiting for its turn alone
        admin_query(db, "DELETE FROM pgpubsub.message")  # another worker took it
        publish(db, Batch, range(10, 15))
        proc.halt()
        time.sleep(0.2)
    thread.join(10)
    proc.session.close()
    assert ran == []
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message WHERE attempts > 0") == [(0,)]


def _lose_the_reply(db: str, where: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The session of the processor's next claim alone is ended as that claim (``claim``)
    or its mark (``mark``) has committed, before the worker hears of it; the list returned
    gets an item when it was."""
    lost: list[int] = []

    def end_session(proc: ChannelProcessor) -> None:
        lost.append(proc.session.connection.info.backend_pid)
        admin_query(db, "SELECT pg_terminate_backend(%s)", (lost[-1],))
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    claim, process = ChannelProcessor._claim, ChannelProcessor._process

    def claimed(self: ChannelProcessor, suspect: int | None = None) -> Any:
        rows = claim(self, suspect)
        if suspect is not None:
            end_session(self)
        return rows

    def processed(self: ChannelProcessor, rows: Any) -> None:
        if self._alone:  # (marked)
            end_session(self)
        process(self, rows)

    if where == "claim":
        monkeypatch.setattr(ChannelProcessor, "_claim", claimed)
    else:
        monkeypatch.setattr(ChannelProcessor, "_process", processed)
    return lost


@pytest.mark.parametrize("where", ["claim", "mark"])
def test_a_suspect_whose_claim_or_mark_reply_is_lost_is_not_dead_without_running(
    db: str, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The claim of a suspect alone, or its mark, commits; its session is lost before the
    worker hears of it (a network cut, a proxy, a failover). The worker lives and its
    listener never ran: the message runs (review 5 of issue 26: charged and marked by
    its claim, it was dead at its next claim). A lost mark is given back by the next
    round; a lost claim leaves an attempt charged, and the message runs once its lease
    is over."""
    registry = Registry()
    ran: list[int] = []
    registry.add(Batch, lambda n: ran.append(n))
    publish(db, Batch, range(1))
    # max_attempts=3: marked alone at attempt 3, it would be dead of crashes at its next claim
    as_suspects(db, attempts=2)
    proc = processor(db, registry)
    with monkeypatch.context() as patch:
        _lose_the_reply(db, where, patch)
        with pytest.raises(psycopg.OperationalError):
            proc.drain_once()
    proc.session.close()
    proc.session.open()
    proc._recover()  # the next round's first step
    left = admin_query(db, "SELECT attempts, claimed_alone, unfinished FROM pgpubsub.message")
    assert left == [(3 if where == "claim" else 2, False, True)]
    if where == "claim":
        admin_query(db, "UPDATE pgpubsub.message SET run_at = now()")  # its lease is over
    proc.drain_once()
    proc.session.close()
    assert ran == [0] and rows(db) == {}  # done (and deleted: Batch keeps no outcome)


def test_a_suspects_lost_mark_is_given_back_by_a_worker_stopped_before_its_next_round(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, the worker stopped (a deploy) while it waits to reconnect: its thread
    ends without a next round, and gives the suspect back on its way out (review 6 of
    issue 26: marked alone, it was dead at the next worker's claim, never run)."""
    registry = Registry()
    ran: list[int] = []
    registry.add(Batch, lambda n: ran.append(n))
    publish(db, Batch, range(1))
    as_suspects(db, attempts=2)
    proc = processor(db, registry, poll_interval=0.1)
    lost = _lose_the_reply(db, "mark", monkeypatch)
    proc.start()
    wait_until(lambda: lost, timeout=10)
    proc.stop(5, db)
    assert not proc.running
    left = admin_query(db, "SELECT attempts, claimed_alone, unfinished FROM pgpubsub.message")
    assert left == [(2, False, True)]
    monkeypatch.undo()
    other = processor(db, registry)
    other.drain_once()
    other.session.close()
    assert ran == [0] and rows(db) == {}


def test_a_round_gives_back_only_the_claims_it_knows_it_made(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 1 meets a suspect; before its claim alone, worker 2 claims it alone, marks
    it and dies in its listener; worker 1's claim alone then fails on a lost session,
    having committed nothing. Worker 1's next round gives nothing back: the suspect,
    its attempts spent, is dead of crashes, not run again (review 6 of issue 26: a claim
    put in hand before it was sent gave back worker 2's attempt)."""
    registry = Registry()
    ran: list[int] = []
    registry.add(Batch, lambda n: ran.append(n))
    publish(db, Batch, range(1))
    as_suspects(db, attempts=2)
    one, two = processor(db, registry), processor(db, registry)
    claim = ChannelProcessor._claim

    def race(self: ChannelProcessor, suspect: int | None = None) -> Any:
        if self is one and suspect is not None:
            ((mid, _, attempt, *_),) = claim(two, suspect)  # worker 2 claims it alone,
            with two.session.atomic():  # marks it, and dies in its listener
                two.session.execute(
                    _processor.MARK_ALONE_SQL.format(in_parts="true"), ([mid], [attempt])
                )
            two.session.close()
            pid = self.session.connection.info.backend_pid
            admin_query(db, "SELECT pg_terminate_backend(%s)", (pid,))
        return claim(self, suspect)

    monkeypatch.setattr(ChannelProcessor, "_claim", race)
    with pytest.raises(psycopg.OperationalError):
        one.drain_once()
    monkeypatch.undo()
    one.session.close()
    one.session.open()
    admin_query(db, "UPDATE pgpubsub.message SET run_at = now()")  # worker 2's lease is over
    one.drain_once()
    one.session.close()
    assert ran == [] and rows(db)[0][:2] == ("dead", 3)


@dataclass
class Child2(Channel, lock_notifications=True, results=True, concurrency=2):
    n: int


def test_a_listener_waiting_for_a_result_of_a_channel_with_a_suspect_gets_it(db: str) -> None:
    """A listener waits for the result of a message of a channel where a suspect waits for
    its turn alone: the channel's other messages run meanwhile (review 6 of issue 26: a
    claim that met a suspect took nothing, and the listener waited until its timeout)."""
    from pgpubsub._crew import Crew

    log: list[str] = []
    registry = Registry()

    def parent(n: int) -> None:
        time.sleep(0.6)  # the suspect is due meanwhile
        with psycopg.connect(db, autocommit=True) as conn:
            handle = pgpubsub.notify(Child2(n=n), conn=conn)
        log.append(f"parent got {handle.result_sync(timeout=5)}")

    registry.add(Parent, parent)
    registry.add(Child2, lambda n: log.append(f"child {n}") or n * 10)
    publish(db, Child2, range(1))  # n=0: the suspect
    due_soon = "attempts = 1, unfinished = true, run_at = now() + interval '0.3 s'"
    admin_query(db, f"UPDATE pgpubsub.message SET {due_soon}")  # noqa: S608 - constant
    crew = Crew()
    procs = [processor(db, registry, Child2, poll_interval=0.1) for _ in range(2)]
    for proc in procs:
        proc.crew = crew
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify(Parent(n=7), conn=conn)
    procs.append(processor(db, registry, Parent, poll_interval=0.1))
    for proc in procs:
        proc.start()
    try:
        wait_until(lambda: len(log) == 3, timeout=10)
    finally:
        for proc in procs:
            proc.stop(5)
    assert log == ["child 7", "parent got 70", "child 0"]


@dataclass
class Quiet(Channel, lock_notifications=True, concurrency=2):
    n: int


def test_a_suspect_holds_up_no_other_message_of_its_channel(db: str) -> None:
    """A channel with a suspect and ten other messages, while a listener of another channel
    of the process runs for 1.5 s: the ten run at once, the suspect once that listener is
    done (review 6 of issue 26: a claim that met the suspect took nothing, and the ten
    waited for the other channel)."""
    from pgpubsub._crew import Crew

    quiet: list[tuple[int, float]] = []
    slow: list[float] = []
    registry = Registry()
    registry.add(Quiet, lambda n: quiet.append((n, time.monotonic())))

    def slow_listener(n: int) -> None:
        slow.append(time.monotonic())
        time.sleep(1.5)
        slow.append(time.monotonic())

    registry.add(Batch, slow_listener)
    publish(db, Quiet, range(1))
    as_suspects(db)
    publish(db, Quiet, range(1, 11))
    publish(db, Batch, range(1))
    crew = Crew()
    procs = [processor(db, registry, Quiet, poll_interval=0.2) for _ in range(2)]
    for proc in procs:
        proc.crew = crew
    procs.insert(0, processor(db, registry, Batch, poll_interval=0.2))
    procs[0].start()
    wait_until(lambda: slow)  # in its listener
    for proc in procs[1:]:
        proc.start()
    try:
        wait_until(lambda: len(quiet) == 11, timeout=15)
    finally:
        for proc in procs:
            proc.stop(5)
    ten = [at for n, at in quiet if n]
    assert max(ten) < slow[1] < dict(quiet)[0], "the ten waited for the other channel"


def test_a_turn_alone_stays_alone_when_another_processor_waits_for_one_in_vain() -> None:
    """A processor's wait for its turn alone that ends without one leaves another's turn
    alone as it is: no batch gets in beside it (review 7 of issue 26: the failed wait
    cleared the turn, a batch ran beside a suspect, and the suspect was charged with its
    crash)."""
    from pgpubsub._processor import _Gate

    gate = _Gate()
    events: list[str] = []
    running = threading.Event()

    def suspect() -> None:
        with gate.exclusive() as alone:
            assert alone
            running.set()
            time.sleep(0.5)
            events.append("suspect done")

    def batch() -> None:
        with gate.shared():
            events.append("batch in")

    first = threading.Thread(target=suspect)
    first.start()
    assert running.wait(5)
    with gate.exclusive(0) as alone:  # another processor: no turn now
        assert not alone
    with gate.exclusive(0.05) as alone:
        assert not alone
    second = threading.Thread(target=batch)
    second.start()
    first.join(5)
    second.join(5)
    assert events == ["suspect done", "batch in"]


@dataclass
class SlowSuspect(Channel, lock_notifications=True):
    n: int


@dataclass
class LoneSuspect(Channel, lock_notifications=True):
    n: int


def test_a_suspect_runs_alone_while_another_waits_for_its_turn_in_vain(db: str) -> None:
    """One processor runs its suspect alone; another's claim meets a suspect of its own and
    its wait for a turn ends without one; a third claims a message. That message's
    listener runs after the suspect's, not beside it (review 7 of issue 26)."""
    events: list[str] = []
    registry = Registry()
    started = threading.Event()

    def slow_suspect(n: int) -> None:
        events.append("suspect starts")
        started.set()
        time.sleep(1.0)
        events.append("suspect ends")

    registry.add(SlowSuspect, slow_suspect)
    registry.add(LoneSuspect, lambda n: events.append("other suspect runs"))
    registry.add(Batch, lambda n: events.append("message runs"))
    publish(db, SlowSuspect, range(1))
    publish(db, LoneSuspect, range(1))
    as_suspects(db)
    procs = [processor(db, registry, ch) for ch in (SlowSuspect, LoneSuspect, Batch)]
    threads = [threading.Thread(target=proc.drain_once) for proc in procs]
    threads[0].start()
    assert started.wait(10)
    threads[1].start()
    threads[1].join(0.6)  # its wait for a turn alone (ALONE_WAIT) ended in vain
    publish(db, Batch, range(1))
    threads[2].start()
    for thread in threads:
        thread.join(15)
    for proc in procs:
        proc.session.close()
    assert events.index("message runs") > events.index("suspect ends"), events


@dataclass
class Mixed(Channel, lock_notifications=True):
    n: int


def test_a_claim_that_meets_an_unkeyed_suspect_takes_the_keyed_messages(db: str) -> None:
    """An unkeyed suspect heads no ordering key: a claim that meets it takes the keyed
    messages as it takes unkeyed ones (review 7 of issue 26: the key of the unkeyed
    suspect, NULL, made every key's NOT IN unknown, and the claim took none)."""
    from pgpubsub._processor import GATE

    registry = Registry()
    ran: list[int] = []
    registry.add(Mixed, lambda n: ran.append(n))
    publish(db, Mixed, range(1))
    as_suspects(db)
    with psycopg.connect(db) as conn:
        for n, key in [(1, "a"), (2, "b")]:
            pgpubsub.notify(Mixed(n=n), conn=conn, ordering_key=key)
    proc = processor(db, registry, Mixed)
    with GATE.shared():  # another channel's listener runs: no turn alone now
        proc.drain_once()
    proc.session.close()
    assert sorted(ran) == [1, 2]


@dataclass
class Leased(Channel, lock_notifications=True, retry_delay=0.3, retry_max_delay=0.3, retention=60):
    n: int


def test_a_round_lost_with_its_session_is_given_back_before_its_lease_ends(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A processor's session is lost as it starts its batch (its server process ended
    while it rested: a server restart). The batch is given back at once, uncharged: before,
    it was given back at the next round, after the reconnect wait (0.5 s), when its lease
    (0.3 s here) had ended and another worker had claimed it again, the attempt lost (the
    chaos tier, seed 5: a message dead after two runs of three)."""
    registry = Registry()
    registry.add(Leased, lambda n: None)
    lost = session_lost_at_first_lock(db, monkeypatch)
    one = processor(db, registry, Leased, poll_interval=0.05)
    one.start()
    publish(db, Leased, range(1))
    other = processor(db, registry, Leased, poll_interval=0.05)  # another worker's
    try:
        wait_until(lambda: lost, timeout=10)
        other.start()
        wait_until(lambda: rows(db)[0][0] == "done", timeout=10)
    finally:
        one.stop(5)
        other.stop(5)
    assert rows(db)[0][:2] == ("done", 1)


@dataclass
class Lone(Channel, lock_notifications=True, retry_delay=5, retention=60):
    n: int


class SlowToLog(logging.Handler):
    """A handler that takes its time (a network log sink) over a failed round's line."""

    def emit(self, record: logging.LogRecord) -> None:
        if "trying again" in record.getMessage():
            time.sleep(2)


@pytest.mark.parametrize("slow", ["reconnect", "log"])
@pytest.mark.parametrize("alone", [True, False], ids=["suspect alone", "batch"])
def test_a_stop_past_the_grace_during_a_failed_rounds_give_back_keeps_its_rules(
    db: str, monkeypatch: pytest.MonkeyPatch, alone: bool, slow: str
) -> None:
    """A listener ends its own session; the failed round's give-back waits for a slow
    reconnect (a server restarting), or its log line for a slow handler, when a stop
    past the grace comes (review 9 of issue 26: the stop during the log line). The stop gives the
    rows back as the round's give-back would: a suspect whose listener ran alone keeps its
    attempt and its mark (it may have ended the session itself), a batch's messages are
    uncharged and each runs alone next (review 8 of issue 26: the stop gave them back as
    a batch whose listener still ran: the suspect uncharged and unmarked, the batch's
    messages no longer to run alone)."""
    from pgpubsub import durable as api

    registry = Registry()
    ran: list[int] = []

    def ends_its_session(n: int) -> None:
        ran.append(n)
        if alone or n == 2:
            api.connection().execute("SELECT pg_terminate_backend(pg_backend_pid())")

    registry.add(Lone, ends_its_session)
    publish(db, Lone, range(1, 2 if alone else 3))
    if alone:
        as_suspects(db)
    opened = PsycopgSession.open

    def slow_open(self: PsycopgSession) -> None:
        if ran and (self.conn is None or self.conn.closed):
            time.sleep(2)
        opened(self)

    if slow == "reconnect":
        monkeypatch.setattr(PsycopgSession, "open", slow_open)
    handler = SlowToLog()
    if slow == "log":
        logging.getLogger("pgpubsub.durable").addHandler(handler)
    try:
        proc = processor(db, registry, Lone, poll_interval=0.05)
        proc.start()
        wait_until(lambda: ran, timeout=10)
        time.sleep(0.1)
        proc.stop(0.3, db)
        proc.join()
    finally:
        logging.getLogger("pgpubsub.durable").removeHandler(handler)
    left = admin_query(
        db, "SELECT attempts, unfinished, claimed_alone FROM pgpubsub.message ORDER BY id"
    )
    assert left == ([(2, True, True)] if alone else [(0, True, False)] * 2)


def test_a_suspects_session_lost_before_its_listener_starts_costs_no_attempt(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suspect claimed alone whose session is lost before its listener starts (a
    failover, a killed backend) did nothing to lose it: given back uncharged, still a
    suspect. (A session lost once its listener ran may be its doing: then it keeps the
    attempt.)"""
    registry = Registry()
    ran: list[int] = []
    registry.add(Batch, lambda n: ran.append(n))
    publish(db, Batch, range(1))
    as_suspects(db)
    proc = processor(db, registry)
    kills = session_lost_at_first_lock(db, monkeypatch)
    with pytest.raises(psycopg.OperationalError):
        proc.drain_once()
    assert ran == [] and kills
    proc.session.close()
    proc.session.open()
    proc._recover()  # as the next round does
    left = admin_query(db, "SELECT attempts, unfinished, claimed_alone FROM pgpubsub.message")
    proc.session.close()
    assert left == [(1, True, False)]


# -- 2. an exception text PostgreSQL cannot store ------------------------------------------


def test_an_exception_text_with_nul_or_a_lone_surrogate_fails_only_its_message(db: str) -> None:
    weird = os.fsdecode(b"caf\xe9.txt")  # what os.listdir gives for a non-UTF-8 name
    registry = Registry()

    def record(n: int) -> None:
        durable.connection().execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
        if n == 3:
            raise OSError(f"no such file: {weird}")
        if n == 6:
            raise ValueError("a NUL \x00 here")

    registry.add(Batch, record)
    publish(db, Batch, range(10))
    proc = processor(db, registry)
    proc.drain_once()
    proc.session.close()
    assert effects(db) == {n: 1 for n in range(10) if n not in (3, 6)}
    stored = rows(db)
    assert set(stored) == {3, 6}
    assert stored[3][:2] == ("pending", 1) and "caf\\udce9.txt" in stored[3][2]
    assert stored[6][:2] == ("pending", 1) and "a NUL \\x00 here" in stored[6][2]
    assert (proc.processed, proc.failed) == (8, 2)


# -- 3. a write that fails only at COMMIT -------------------------------------------------------


@pytest.fixture
def deferred(db: str) -> str:
    """parent rows 0..29 but 7; a child row must name a parent (checked at COMMIT, as Django's)."""
    admin_query(db, "CREATE TABLE parent (id int PRIMARY KEY)")
    admin_query(db, "INSERT INTO parent SELECT i FROM generate_series(0, 29) i WHERE i <> 7")
    admin_query(
        db,
        "CREATE TABLE child (parent_id int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)",
    )
    return db


@pytest.mark.parametrize("defer_in_listener", [False, True])
def test_a_write_that_fails_at_commit_fails_only_its_message(
    deferred: str, defer_in_listener: bool
) -> None:
    """Deferred constraints are checked in the message's savepoint; one a listener defers
    itself fails the COMMIT, and then each message runs alone, in its own transaction."""
    db = deferred
    registry = Registry()
    calls: Counter[int] = Counter()

    def write(n: int) -> None:
        calls[n] += 1
        conn = durable.connection()
        if defer_in_listener:
            conn.execute("SET CONSTRAINTS ALL DEFERRED")
        conn.execute("INSERT INTO child VALUES (%s)", (n,))

    registry.add(Batch, write)
    publish(db, Batch, range(30))
    proc = processor(db, registry)
    proc.drain_once()
    proc.session.close()
    assert admin_query(db, "SELECT count(*), count(DISTINCT parent_id) FROM child") == [(29, 29)]
    stored = rows(db)
    assert set(stored) == {7}
    assert stored[7][:2] == ("pending", 1) and "foreign key" in stored[7][2]
    assert (proc.processed, proc.failed) == (29, 1)  # what committed
    # A listener runs again for a failure it did not cause only after a failed COMMIT.
    assert set(calls.values()) == ({2} if defer_in_listener else {1})


# -- 10. a neighbour's failure never runs a listener again ------------------------------


@pytest.mark.parametrize("failure", ["raises", "database error"])
@pytest.mark.parametrize("warm", [False, True])
def test_a_failing_message_runs_no_other_listener_again(db: str, failure: str, warm: bool) -> None:
    """A listener with an effect outside the database (an e-mail: a few ms) runs once per
    attempt of its own message, whatever its neighbours do, in the first batch of a
    processor as in the following ones."""
    admin_query(db, "CREATE TABLE once (n int UNIQUE)")
    admin_query(db, "INSERT INTO once VALUES (4)")  # message 4's write is a duplicate
    registry = Registry()
    sent: Counter[int] = Counter()

    def listener(n: int) -> None:
        time.sleep(0.003)  # sending the e-mail
        sent[n] += 1
        if n == 4 and failure == "raises":
            raise RuntimeError("flaky")
        durable.connection().execute("INSERT INTO once VALUES (%s)", (n,))

    registry.add(Batch, listener)
    proc = processor(db, registry)
    if warm:  # a first batch, all fine: the processor has measured its listeners
        publish(db, Batch, range(100, 110))
        proc.drain_once()
    publish(db, Batch, range(10))
    proc.drain_once()
    proc.session.close()
    assert sent == {n: 1 for n in [*range(10), *(range(100, 110) if warm else [])]}
    assert admin_query(db, "SELECT count(*) FROM once WHERE n < 100") == [(10,)]
    assert set(rows(db)) == {4}
    assert (proc.processed, proc.failed) == (19 if warm else 9, 1)


#: How a listener uses the processing connection: not at all, pipelined writes, a write
#: whose result it reads, executemany.
USES = ["none", "write", "read", "many"]


def _use(how: str, n: int) -> None:
    conn = durable.connection()
    if how == "write":
        conn.execute("INSERT INTO once VALUES (%s)", (n,))
        conn.execute("INSERT INTO effects VALUES ('job', %s, 0)", (n,))
    elif how == "read":
        (got,) = conn.execute("INSERT INTO once VALUES (%s) RETURNING n", (n,)).fetchone()
        conn.execute("INSERT INTO effects VALUES ('job', %s, 0)", (got,))
    elif how == "many":
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO once VALUES (%s)", [(n,)])
            cur.executemany("INSERT INTO effects VALUES ('job', %s, 0)", [(n,)])


@pytest.mark.parametrize(
    ("how", "failure"),
    [("none", "raises")]
    + [(how, f) for how in USES[1:] for f in ["raises", "database error", "raises after writing"]],
)
def test_no_listener_runs_again_for_a_neighbours_failure(db: str, how: str, failure: str) -> None:
    """Fast listeners (no waiting on the database per message), a batch of 30 in which
    message 4 fails - it raises, or its write fails at the server (found late: the
    writes of a batch are pipelined), or it raises after writing - every listener runs
    exactly once, the others' writes commit once, message 4's are undone, and counters
    count what committed: in every batch of a processor, not only its first."""
    admin_query(db, "CREATE TABLE once (n int UNIQUE)")
    if failure == "database error":
        admin_query(db, "INSERT INTO once VALUES (4)")  # message 4's write is a duplicate
    registry = Registry()
    calls: Counter[int] = Counter()

    def listener(n: int) -> None:
        calls[n] += 1
        if n == 4 and failure == "raises":
            raise RuntimeError("flaky")
        _use(how, n)
        if n == 4 and failure == "raises after writing":
            raise RuntimeError("flaky after its write")

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(100, 130))  # a first batch, all fine: the processor warms up
    proc.drain_once()
    publish(db, Batch, range(30))
    proc.drain_once()
    proc.session.close()
    assert calls == {n: 1 for n in [*range(30), *range(100, 130)]}
    expected = {n: 1 for n in [*range(30), *range(100, 130)] if n != 4}
    assert effects(db) == ({} if how == "none" else expected)
    if how != "none":
        assert admin_query(db, "SELECT count(*) FROM once WHERE n = 4") == [
            (1 if failure == "database error" else 0,)
        ]
    assert set(rows(db)) == {4}
    assert rows(db)[4][:2] == ("pending", 1)
    assert (proc.processed, proc.failed) == (59, 1)


def test_a_late_failure_holds_back_its_key_and_runs_no_one_again(db: str) -> None:
    """Keys a and b interleaved; a's second message writes a duplicate (the error is known
    only when the pipeline is waited for). a's later messages do not run before that
    failure is known: they are given back unrun, to run after its retry; b's all complete;
    no listener runs twice."""
    admin_query(db, "CREATE TABLE once (n int UNIQUE)")
    admin_query(db, "INSERT INTO once VALUES (2)")
    registry = Registry()
    calls: Counter[int] = Counter()

    def listener(n: int) -> None:
        calls[n] += 1
        durable.connection().execute("INSERT INTO once VALUES (%s)", (n,))

    registry.add(Batch, listener)
    proc = processor(db, registry)
    publish(db, Batch, range(100, 110))  # a first batch, all fine: the processor warms up
    proc.drain_once()
    with psycopg.connect(db) as conn:
        for n in range(12):
            pgpubsub.notify(Batch(n=n), conn=conn, ordering_key="ab"[n % 2])
    proc.drain_once()
    proc.session.close()
    a = [n for n in range(12) if n % 2 == 0]
    assert calls == {n: 1 for n in [*range(12), *range(100, 110)] if n % 2 or n <= 2 or n >= 100}
    assert set(rows(db)) == set(a[1:])  # 2 failed, 4.. wait behind it
    assert rows(db)[2][:2] == ("pending", 1)
    assert all(rows(db)[n][:2] == ("pending", 0) for n in a[2:])  # given back, uncharged
    assert (proc.processed, proc.failed) == (17, 1)


# -- 4. delays count from the call ----------------------------------------------------------


def test_delay_counts_from_the_call_not_the_transaction_start(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("SELECT pg_sleep(1.2)")  # the publisher's transaction is 1.2 s old
        pgpubsub.notify(Batch(n=1), conn=conn, delay=1)
        (late,) = conn.execute(
            "SELECT run_at - clock_timestamp() > interval '0.7 s' FROM pgpubsub.message"
        ).fetchone()  # type: ignore[misc]
    assert late


@dataclass
class SlowRetry(Channel, lock_notifications=True, retry_delay=1, retry_max_delay=1):
    n: int


def test_a_retry_delay_counts_from_the_failure_not_the_batch_start(db: str) -> None:
    registry = Registry()

    def slow_then_fail(n: int) -> None:
        durable.connection().execute("SELECT pg_sleep(1.2)")
        raise RuntimeError("try again later")

    registry.add(SlowRetry, slow_then_fail)
    publish(db, SlowRetry, range(1))
    proc = processor(db, registry, SlowRetry)
    proc.drain_once()
    proc.session.close()
    ((ahead,),) = admin_query(
        db, "SELECT extract(epoch FROM run_at - clock_timestamp()) FROM pgpubsub.message"
    )
    assert 0.5 < ahead <= 1.0  # type: ignore[operator]


# -- 6. idle processors sleep ---------------------------------------------------------------


class CountingSession(PsycopgSession):
    """A real session that counts the statements it runs, by SQL text."""

    def __init__(self, conninfo: str):
        super().__init__(conninfo)
        self.counts: Counter[str] = Counter()

    def execute(self, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
        # a claim counts as its template, whatever partitions it reads
        self.counts[claim_template(query) or query] += 1
        return super().execute(query, params)

    def fetch(self, query: str, params: Any = (), first: str | None = None) -> Any:
        # (a claim is fetched, with its SET LOCAL first: counted all the same)
        self.counts[claim_template(query) or query] += 1
        return super().fetch(query, params, first)


@dataclass
class ShortLease(Channel, lock_notifications=True, retry_delay=0.05, retry_max_delay=0.05):
    n: int


@dataclass
class OneAtATime(Channel, lock_notifications=True, max_in_flight=1):
    n: int


@pytest.mark.parametrize(
    "channel, statement", [(ShortLease, CLAIM_SQL), (OneAtATime, TAKE_SLOT_SQL)]
)
def test_a_processor_with_nothing_it_can_take_sleeps(db: str, channel: Any, statement: str) -> None:
    """One message held past its lease (or holding the only slot): the other processor
    of the channel does not claim (or try for a slot) in a loop."""
    registry = Registry()
    started, release = threading.Event(), threading.Event()

    def hold(n: int) -> None:
        started.set()
        release.wait(20)

    registry.add(channel, hold)
    spec = spec_of(channel)
    procs = [
        ChannelProcessor(CountingSession(db), spec, registry.listeners(spec), poll_interval=0.5)
        for _ in range(2)
    ]
    publish(db, channel, range(1))
    for p in procs:
        p.start()
    try:
        assert started.wait(10)
        time.sleep(0.2)  # past the lease
        before = [p.session.counts[statement] for p in procs]  # type: ignore[attr-defined]
        time.sleep(1.0)  # a window to count what the idle processor does
        rounds = [p.session.counts[statement] - b for p, b in zip(procs, before, strict=True)]  # type: ignore[attr-defined]
    finally:
        release.set()
        for p in procs:
            p.stop(10)
    assert max(rounds) <= 5, rounds  # a poll every 0.5 s, not a claim every millisecond
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message") == [(0,)]


# -- issue 26: one wake-up, one claim ---------------------------------------------------------


@dataclass
class Crowd(Channel, lock_notifications=True, concurrency=8):
    n: int


def test_one_wake_up_costs_one_claim_and_idle_processors_cost_nothing(db: str) -> None:
    """A worker with concurrency=8: one published message costs a few claims, not one per
    processor (and no 8 next-due queries); while idle, only one of them polls."""
    from helpers import Running

    registry = Registry()
    done = threading.Event()
    registry.add(Crowd, lambda n: done.set())
    sessions: list[CountingSession] = []

    def session() -> CountingSession:
        sessions.append(CountingSession(db))
        return sessions[-1]

    def queries() -> int:
        return sum(s.counts[CLAIM_SQL] + s.counts[NEXT_DUE_SQL] for s in sessions)

    worker = Running(db, registry, session_factory=session, register=False)
    try:
        time.sleep(0.5)  # every processor has claimed once at start and gone idle
        before = queries()
        time.sleep(2.0)  # idle: a poll a second, by one processor
        idle = queries() - before
        before = sum(s.counts[CLAIM_SQL] for s in sessions)
        publish(db, Crowd, range(1))
        assert done.wait(10)
        time.sleep(0.3)
        claims = sum(s.counts[CLAIM_SQL] for s in sessions) - before
    finally:
        worker.stop()
    assert len(sessions) == 8
    assert idle <= 6, idle  # 8 processors polling: 32
    # One claim takes it, one finds the queue empty, one last look once the worker has
    # registered as asleep (publishers wake it then); every processor woken: 8. The last
    # look reads the partitions where messages are stored (the ring's live ones): a claim
    # of every partition after it was one more per message (4; at 400 messages/s, 3,300
    # of 11,600 claims).
    assert claims <= 3, claims


class OverlapSession(PsycopgSession):
    """A real session noting each claim statement's start, end and whether it took
    anything, in ``claims``, and each claim transaction's start and end, in
    ``transactions`` (lists shared by the worker's sessions); its claim transactions
    take ``commit`` seconds more to commit, as over a slow network."""

    def __init__(
        self,
        conninfo: str,
        claims: list[tuple[float, float, bool]],
        transactions: list[tuple[float, float]],
        commit: float,
    ):
        super().__init__(conninfo)
        self.claims, self.transactions, self.commit = claims, transactions, commit
        self.claimed = False

    @contextmanager
    def atomic(self) -> Iterator[Any]:
        started, self.claimed = time.monotonic(), False
        with super().atomic() as tx:
            yield tx
            if self.claimed:
                time.sleep(self.commit)
        if self.claimed:
            self.transactions.append((started, time.monotonic()))

    def fetch(self, query: str, params: Any = (), first: str | None = None) -> Any:
        if claim_template(query) is not CLAIM_SQL:
            return super().fetch(query, params, first)
        started = time.monotonic()
        rows = super().fetch(query, params, first)
        self.claims.append((started, time.monotonic(), rows[0][0] is not None))
        self.claimed = True
        return rows


def paced_claims(
    db: str, channel: Any, total: int, rate: float, sleep: float, commit: float = 0.0
) -> tuple[list[tuple[float, float, bool]], list[tuple[float, float]]]:
    """``total`` single-message commits at ``rate`` a second (0: at once) to a worker of
    ``channel`` whose listener sleeps ``sleep`` s; its claims and claim transactions."""
    from helpers import Running

    registry = Registry()
    seen: list[int] = []
    registry.add(channel, lambda n: (time.sleep(sleep), seen.append(n)))
    claims: list[tuple[float, float, bool]] = []
    transactions: list[tuple[float, float]] = []

    def session() -> OverlapSession:
        return OverlapSession(db, claims, transactions, commit)

    worker = Running(db, registry, session_factory=session, register=False)
    try:
        time.sleep(1.0)
        claims.clear()
        transactions.clear()
        with psycopg.connect(db) as conn:
            t0 = time.monotonic()
            for n in range(total):
                pgpubsub.notify(channel(n=n), conn=conn)
                conn.commit()
                if rate and (due := t0 + (n + 1) / rate - time.monotonic()) > 0:
                    time.sleep(due)
        deadline = time.monotonic() + 30
        while len(seen) < total and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
    assert sorted(seen) == list(range(total))
    return claims, transactions


@dataclass
class Slow(Channel, lock_notifications=True, concurrency=32):
    n: int


@dataclass
class SlowSlotted(Channel, lock_notifications=True, concurrency=32, max_in_flight=64):
    n: int


@dataclass
class Slotted(Channel, lock_notifications=True, concurrency=8, max_in_flight=16):
    n: int


@pytest.mark.parametrize("channel, sleep", [(Crowd, 0.005), (Slow, 0.15), (SlowSlotted, 0.15)])
def test_a_worker_runs_one_claim_of_a_channel_at_a_time(
    db: str, channel: Any, sleep: float
) -> None:
    """Paced single-message publishes at 150/s, concurrency 8 or 32: a worker's claims of a
    channel never run two at once, however its processors were woken or finished together
    (before, 8 at once; at concurrency=32 and 400 messages/s up to 16 claims of one worker
    ran at once). Claims right after a full one went side by side for a while (review of
    issue 26): a claim of one message is full (slow listeners, max_in_flight channels), and
    those that found nothing ran 4 and 6 at once."""
    claims, _ = paced_claims(db, channel, total=600, rate=150, sleep=sleep)
    assert most_at_once([(a, b) for a, b, _ in claims]) == 1
    assert any(not took for _, _, took in claims)  # (the looks that found nothing too)


def test_claim_transactions_go_side_by_side(db: str) -> None:
    """Only the claim statements take turns, not their transactions: a max_in_flight channel
    (a message a claim) with a backlog, over a network where a COMMIT takes 20 ms. A turn
    held from BEGIN to COMMIT capped a worker's rate at one message per claim's round trips
    (review of issue 26: 20-40% slower over a 1 ms network)."""
    _, transactions = paced_claims(db, Slotted, total=300, rate=0, sleep=0.02, commit=0.02)
    assert most_at_once(transactions) >= 4


def test_a_claims_backend_is_idle_once_its_rows_are_back(db: str) -> None:
    """A claim sent in a pipeline with its SET LOCAL left its backend active, waiting for
    the pipeline's end, until the thread got to read the rows: at concurrency=32 and 400
    messages/s, up to 27 backends showed active where claims had long finished."""
    proc = processor(db, Registry(), Crowd)
    publish(db, Crowd, range(1))
    pid = proc.session.conn.info.backend_pid  # type: ignore[union-attr]
    states: list[str] = []
    fetch = proc.session.fetch

    def watched(query: str, params: Any = (), first: str | None = None) -> Any:
        rows = fetch(query, params, first)
        if claim_template(query) is CLAIM_SQL:
            states.extend(
                r[0]
                for r in admin_query(
                    db, "SELECT state FROM pg_catalog.pg_stat_activity WHERE pid = %s", (pid,)
                )
            )
        return rows

    proc.session.fetch = watched  # type: ignore[method-assign]
    try:
        with proc.session.atomic():
            assert len(proc._claim()) == 1
    finally:
        proc.session.close()
    assert states == ["idle in transaction"]


def test_a_wake_up_during_the_pollers_next_due_query_is_not_lost(db: str) -> None:
    """A NOTIFY (crew.wake_one, as DurableRunner's subscription calls it) that arrives while
    the only processor, idle, runs its next-due query: the new message waits for the poll."""
    registry = Registry()
    done: dict[int, float] = {}

    def listener(n: int) -> None:
        done[n] = time.monotonic()

    registry.add(Batch, listener)
    proc = processor(db, registry, poll_interval=5.0)
    original = proc._next_due
    sent: list[float] = []

    def next_due() -> float:
        wait = original()
        if not sent:  # a message published and its wake-up delivered while the query ran
            publish(db, Batch, range(1))
            sent.append(time.monotonic())
            proc.crew.wake_one()
        return wait

    proc._next_due = next_due  # type: ignore[method-assign]
    proc.start()
    try:
        deadline = time.monotonic() + 8
        while 0 not in done and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.stop(5)
    assert 0 in done
    assert done[0] - sent[0] < 1.0, f"handled {done[0] - sent[0]:.1f}s after its wake-up"


def test_a_long_query_runs_with_its_named_parameters_converted_once(db: str) -> None:
    """psycopg converts the placeholders of a query over 4,096 characters at every run
    (a sixth of an empty claim's time in the worker): the session converts such a query
    once, to $n, a name used twice the same $n, and %% a %."""
    from pgpubsub import session as sessions

    query = "SELECT %(a)s::int, %(b)s::text, %(a)s::int + 1, '100%%' -- " + "x" * sessions._LONG
    run = PsycopgSession(db)
    run.open()
    try:
        assert run.execute(query, {"a": 41, "b": "b"}) == [(41, "b", 42, "100%")]
        assert run.fetch(query, {"a": 1, "b": "c"}) == [(1, "c", 2, "100%")]
    finally:
        run.close()
    assert sessions._RAW[query][1] == ("a", "b")
