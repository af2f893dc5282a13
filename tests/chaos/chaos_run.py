"""Runs an operation sequence against a fresh database, real workers and real faults.

Workers are ``pgpubsub listen chaos_listeners --processes 2`` subprocesses;
faults are real signals, ``pg_terminate_backend`` and a restart of the test
server. Every publish is recorded with its outcome (id, committed, deduped,
the earliest instant it may run, its place in commit order), every fault with
the server-clock instant it happened and the worker pids it hit; the workers
record each listener start and end themselves (:mod:`chaos_listeners`). After
the last operation the faults stop, a worker runs, and the run waits (up to
:data:`SETTLE` seconds) for every message to be done, dead or cancelled.
"""

from __future__ import annotations

import datetime
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from chaos_channels import SCHEMA, BatchDone, Crew, Limited, Work
from chaos_ops import CHANNELS, Admin, Concurrent, Fault, Interleaved, Kill, Msg, Op, Publish, Wait
from helpers import Server
from psycopg import sql

import pgpubsub
from pgpubsub import durable, messages

HERE = Path(__file__).resolve().parent
# Seconds the messages get to finish once the faults stop. A worker killed in a
# listener may hold its ordering key until its lease runs out (30 s in the
# design with leases), and a poison message that kills its process does so
# max_attempts times: 3 x 30 s, and the retries and restarts around them.
SETTLE = 150.0
CLASSES = {"chaos_work": Work, "chaos_crew": Crew, "chaos_limited": Limited}


@dataclass
class Published:
    msg: Msg
    id: int | None = None
    committed: bool = False
    deduped: bool = False  # the publish returned a pending message's id: nothing stored
    called: datetime.datetime | None = None  # the server's clock just before the call
    not_before: datetime.datetime | None = None
    seq: int | None = None  # place in commit order


@dataclass
class FaultRecord:
    kind: str
    start: datetime.datetime
    end: datetime.datetime
    pids: frozenset[int] | None = None  # None: every worker session


@dataclass
class Record:
    """Everything a run did and saw, for the checker."""

    published: dict[int, Published] = field(default_factory=dict)
    faults: list[FaultRecord] = field(default_factory=list)
    cancelled: set[int] = field(default_factory=set)
    # cancels that found their message in a worker's hands (messages.cancel's ``stopping``):
    # it ends cancelled (gone, no effect) unless it completes first
    cancel_asked: set[int] = field(default_factory=set)
    purged: set[int] = field(default_factory=set)  # dead when purged
    replayed: set[int] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)
    gave_up: int = 0  # supervisors that exited by themselves
    stop_codes: list[int] = field(default_factory=list)  # supervisors' exit codes on SIGTERM
    orphans: list[int] = field(default_factory=list)  # workers that outlived every supervisor
    # chaos_limited paused: from after the pause's commit to before the resume's
    pauses: list[tuple[datetime.datetime, datetime.datetime]] = field(default_factory=list)
    settled: float | None = None  # seconds to quiescence; None: not within SETTLE
    history: list[tuple[Any, ...]] = field(default_factory=list)
    effects: list[tuple[Any, ...]] = field(default_factory=list)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    results: dict[int, Any] = field(default_factory=dict)  # id -> result, of chaos_work
    batches: dict[int, tuple[int, ...]] = field(default_factory=dict)  # batch id -> its ns
    callbacks: list[dict[str, Any]] = field(default_factory=list)  # the batches' outcomes

    def by_id(self) -> dict[int, int]:
        return {
            p.id: n for n, p in self.published.items() if p.committed and not p.deduped and p.id
        }


def catches_sigterm(pid: int, timeout: float = 10.0) -> None:
    """Wait until process ``pid`` handles SIGTERM (or is gone).

    ``pgpubsub listen`` handles it from the first module of the package on
    (pgpubsub._startup); before that, in the interpreter's first few dozen
    milliseconds, no Python program can, and a SIGTERM ends it by the signal.
    The contract (exit 0) starts there: a supervisor is signalled from then on.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.002)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def _batchable(m: Msg) -> bool:
    """A message ``pgpubsub.batch`` can publish: no publishing option."""
    return (m.delay, m.run_at, m.dedupe_key, m.ordering_key, m.priority) == (None,) * 4 + (0,)


class Run:
    def __init__(self, server: Server, dbname: str, logdir: Path):
        self.server = server
        self.dbname = dbname
        self.dsn = server.dsn(dbname)
        self.log = open(logdir / f"{dbname}.log", "ab")  # noqa: SIM115 - closed by close()
        self.record = Record()
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.retired: list[subprocess.Popen[bytes]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    # -- set-up and tear-down

    @classmethod
    def create(cls, server: Server, dbname: str, logdir: Path) -> Run:
        server.admin_execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        run = cls(server, dbname, logdir)
        durable.migrate(run.dsn)
        with psycopg.connect(run.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)  # type: ignore[arg-type]
        return run

    def workers(self) -> list[int]:
        """Every live process started for this run's database (found by its environment)."""
        mark = f"PGPUBSUB_DSN={self.dsn}\0".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (
                    mark in (entry / "environ").read_bytes()
                    and (entry / "stat").read_text().split(") ")[1][0] != "Z"
                ):
                    found.append(int(entry.name))
            except OSError:
                continue  # gone, or not ours to read
        return sorted(found)

    def _reap_orphans(self) -> None:
        """Workers left when every supervisor has exited: orphans (then killed, by pid)."""
        deadline = time.monotonic() + 10  # SIGTERM'd workers get their --grace of 5s
        while (left := self.workers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.record.orphans = left
        for pid in left:
            os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        for proc in [self.supervisor, *self.retired]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for pid in self.workers():
            os.kill(pid, signal.SIGKILL)
        self.log.close()
        self.server.admin_execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.dbname))
        )

    def start_supervisor(self) -> None:
        env = {
            **os.environ,
            "PGPUBSUB_DSN": self.dsn,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        self.supervisor = subprocess.Popen(
            [sys.executable, "-m", "pgpubsub", "listen", "chaos_listeners",
             "--processes", "2", "--grace", "5"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def now(self) -> datetime.datetime:
        """The server's clock: the history's timestamps are on it."""
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    row = conn.execute("SELECT pg_catalog.clock_timestamp()").fetchone()
                    assert row is not None
                    return row[0]  # type: ignore[no-any-return]
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # -- the operations

    def execute(self, ops: list[Op]) -> Record:
        self.start_supervisor()
        self._wait_listening()  # the operations' timing counts from running workers
        for op in ops:
            self._check_supervisor()
            self.record.counts[type(op).__name__.lower()] += 1
            self._do(op)
        self._settle()
        return self.record

    def _wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity "
                    "WHERE datname = pg_catalog.current_database() "
                    "AND application_name LIKE 'pgpubsub%%' AND query LIKE 'LISTEN%%'"
                ).fetchone()
            if row is not None and row[0] >= 2:
                return
            time.sleep(0.05)
        raise AssertionError(f"the workers were not listening within {timeout}s")

    def _check_supervisor(self) -> None:
        if self.supervisor is not None and self.supervisor.poll() is not None:
            # It gave up (workers dying fast at start): an operator would start it again.
            self.record.gave_up += 1
            self.retired.append(self.supervisor)
            self.start_supervisor()

    def _do(self, op: Op) -> None:
        if isinstance(op, Publish):
            self._publish(op)
        elif isinstance(op, Interleaved):
            self._interleaved(op)
        elif isinstance(op, Concurrent):
            self._concurrent(op)
        elif isinstance(op, Wait):
            self._wait(op)
        elif isinstance(op, Kill):
            self._kill(op)
        elif isinstance(op, Fault):
            self._fault(op)
        elif isinstance(op, Admin):
            self._admin(op)

    def _publish_one(self, conn: psycopg.Connection[Any], m: Msg) -> Published:
        row = conn.execute("SELECT pg_catalog.clock_timestamp()").fetchone()
        assert row is not None
        called: datetime.datetime = row[0]
        options: dict[str, Any] = {"priority": m.priority}
        not_before = None
        if m.delay is not None:
            options["delay"] = m.delay
            not_before = called + datetime.timedelta(seconds=m.delay)
        elif m.run_at is not None:
            not_before = called + datetime.timedelta(seconds=m.run_at)
            options["run_at"] = not_before
        if m.dedupe_key is not None:
            options["dedupe_key"] = m.dedupe_key
        if m.ordering_key is not None:
            options["ordering_key"] = m.ordering_key
        if m.limit_key is not None:
            options["limit_key"] = m.limit_key
        message = CLASSES[m.channel](n=m.n, behaviour=m.behaviour, until=m.until, sleep=m.sleep)
        mid = pgpubsub.notify(message, conn=conn, **options)
        with self._lock:
            # The id of a message published before (identity ids are never reused):
            # the dedupe key matched a pending message and nothing was stored.
            known = {p.id for p in self.record.published.values()}
            pub = Published(m, id=mid, called=called, not_before=not_before, deduped=mid in known)
            self.record.published[m.n] = pub
        return pub

    def _commit(self, conn: psycopg.Connection[Any], pubs: list[Published]) -> None:
        """Commit ``pubs``' transaction and take their places in the commit order, as one step.

        The order's lock is held through the COMMIT: a publisher descheduled between
        its COMMIT and its place would otherwise be placed after a publisher of its
        ordering key that committed later.
        """
        with self._lock:
            conn.commit()
            for p in pubs:
                p.committed = True
                p.seq = next(self._seq)

    def _publish(self, op: Publish) -> None:
        if op.commit and len(op.msgs) > 1 and not op.pause and all(map(_batchable, op.msgs)):
            self._publish_batch(op.msgs)
            return
        with self._connect() as conn:
            pubs = []
            for i, m in enumerate(op.msgs):
                pubs.append(self._publish_one(conn, m))
                if i == 0 and op.pause:
                    time.sleep(op.pause)  # the transaction stays open: run_at counts from the call
            if op.commit:
                self._commit(conn, pubs)
            else:
                conn.rollback()

    def _publish_batch(self, msgs: tuple[Msg, ...]) -> None:
        """A publish of messages without options, as a batch (its callback: BatchDone)."""
        with self._connect() as conn:
            row = conn.execute("SELECT pg_catalog.clock_timestamp()").fetchone()
            assert row is not None
            members = [
                CLASSES[m.channel](n=m.n, behaviour=m.behaviour, until=m.until, sleep=m.sleep)
                for m in msgs
            ]
            made = pgpubsub.batch(members, on_complete=BatchDone("chaos"), conn=conn)
            # Members' ids: channel by channel (in order of first appearance), in order.
            order = sorted(msgs, key=lambda m: [x.channel for x in msgs].index(m.channel))
            ids = zip(order, made.members, strict=True)
            pubs = [Published(m, id=mid, called=row[0]) for m, mid in ids]
            with self._lock:
                for p in pubs:
                    self.record.published[p.msg.n] = p
            self._commit(conn, pubs)
            with self._lock:
                self.record.batches[int(made)] = tuple(m.n for m in msgs)

    def _interleaved(self, op: Interleaved) -> None:
        """``first`` publishes, then ``second`` publishes and commits in another thread.

        If publishing ``second`` waits for ``first`` (publishers of one key taking
        turns), ``first`` commits first; otherwise ``second`` does. Either way the
        recorded commit order is the one that happened (:meth:`_commit`).
        """
        done = threading.Event()
        errors: list[BaseException] = []

        def publish_second() -> None:
            try:
                with self._connect() as conn:
                    b = self._publish_one(conn, op.second)
                    self._commit(conn, [b])
            except BaseException as exc:  # reported below
                errors.append(exc)
            finally:
                done.set()

        with self._connect() as first:
            a = self._publish_one(first, op.first)
            thread = threading.Thread(target=publish_second)
            thread.start()
            done.wait(1.0)  # long enough to commit, unless it waits for ``first``
            self._commit(first, [a])
        thread.join(60)
        if errors:
            raise errors[0]

    def _concurrent(self, op: Concurrent) -> None:
        errors: list[BaseException] = []

        def lane(msgs: tuple[Msg, ...]) -> None:
            try:
                with self._connect() as conn:
                    for m in msgs:
                        pub = self._publish_one(conn, m)
                        self._commit(conn, [pub])
            except BaseException as exc:  # reported by the caller
                errors.append(exc)

        threads = [threading.Thread(target=lane, args=(msgs,)) for msgs in op.lanes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]

    def _connect(self) -> psycopg.Connection[Any]:
        deadline = time.monotonic() + 30
        while True:
            try:
                # A publish that waits for ever is an error, not a hung test.
                return psycopg.connect(self.dsn, options="-c statement_timeout=30000")
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _kill(self, op: Kill) -> None:
        assert self.supervisor is not None
        sig = signal.SIGKILL if op.sig == "KILL" else signal.SIGTERM
        children = _children(self.supervisor.pid)
        if op.target == "worker":
            if not children:
                return
            pid = children[op.pick % len(children)]
            at = self.now()
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return  # it exited since it was listed
            self.record.faults.append(FaultRecord(f"SIG{op.sig} worker", at, at, frozenset([pid])))
            return
        at = self.now()
        if op.sig == "TERM":
            catches_sigterm(self.supervisor.pid)
        self.supervisor.send_signal(sig)
        # SIGKILL: the children get SIGTERM from the kernel (PR_SET_PDEATHSIG).
        self.record.faults.append(
            FaultRecord(f"SIG{op.sig} supervisor", at, at, frozenset(children))
        )
        self.retired.append(self.supervisor)
        if op.sig == "TERM":
            self.record.stop_codes.append(self.supervisor.wait(30))
        self.start_supervisor()  # a new deployment takes over

    def _wait(self, op: Wait) -> None:
        if not op.paused:
            time.sleep(op.seconds)  # the scenario's own timing, not a synchronisation
            return
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            messages.pause(conn, Limited)
            paused_at = self.now()  # after the commit
            time.sleep(op.seconds)
            resumed_at = self.now()  # before the resume commits
            messages.resume(conn, Limited)
        self.record.pauses.append((paused_at, resumed_at))

    def _fault(self, op: Fault) -> None:
        start = self.now()
        if op.kind == "terminate":
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
                    "WHERE datname = pg_catalog.current_database() "
                    "AND application_name LIKE 'pgpubsub%%' AND pid <> pg_catalog.pg_backend_pid()"
                )
        elif self.server.embedded is not None:
            self.server.embedded.restart()
        else:
            return  # a server given by PGPUBSUB_TEST_DSN is not ours to restart
        self.record.faults.append(FaultRecord(op.kind, start, self.now()))

    def _admin(self, op: Admin) -> None:
        by_id = self.record.by_id()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            if op.kind == "cancel":
                ids = sorted(by_id)
                if not ids:
                    return
                mid = ids[op.pick % len(ids)]
                result = messages.cancel(conn, ids=[mid])
                if result == 1:
                    self.record.cancelled.add(by_id[mid])
                elif result.stopping:
                    self.record.cancel_asked.add(by_id[mid])
                return
            dead = [
                i
                for (i,) in conn.execute(
                    "SELECT id FROM pgpubsub.message WHERE status = 'dead' AND channel = ANY(%s)",
                    (list(CHANNELS),),
                ).fetchall()
            ]
            if not dead:
                return
            if op.kind == "replay":
                messages.replay(conn, ids=dead)
                self.record.replayed.update(by_id[i] for i in dead if i in by_id)
            else:
                messages.purge(conn, status="dead", ids=dead)
                self.record.purged.update(by_id[i] for i in dead if i in by_id)

    # -- the end: faults stop, everything must finish

    def _settle(self) -> None:
        self._check_supervisor()
        started = time.monotonic()
        while time.monotonic() - started < SETTLE:
            self._check_supervisor()
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT pg_catalog.count(*) FROM pgpubsub.message "
                    "WHERE status = 'pending' AND channel = ANY(%s)",
                    (list(CHANNELS),),
                ).fetchone()
            if row == (0,):
                self.record.settled = time.monotonic() - started
                break
            time.sleep(0.2)
        assert self.supervisor is not None
        catches_sigterm(self.supervisor.pid)
        self.supervisor.send_signal(signal.SIGTERM)
        try:
            self.record.stop_codes.append(self.supervisor.wait(30))
        except subprocess.TimeoutExpired:
            self.record.stop_codes.append(-999)
        for proc in self.retired:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._reap_orphans()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self.record.history = conn.execute(
                "SELECT kind, channel, n, pid, at, attempt, detail FROM chaos_history ORDER BY id"
            ).fetchall()
            self.record.effects = conn.execute(
                "SELECT channel, n, pid, at, tick FROM chaos_effect"
            ).fetchall()
            self.record.rows = conn.execute(
                "SELECT id, channel, status, attempts, last_error FROM pgpubsub.message"
            ).fetchall()
            self.record.callbacks = [
                payload["batch"]
                for (payload,) in conn.execute(
                    "SELECT payload::jsonb FROM pgpubsub.message WHERE channel = %s",
                    ("chaos_batch_done",),
                ).fetchall()
            ]
            self.record.results = dict(
                conn.execute(  # type: ignore[arg-type]
                    "SELECT id, result FROM pgpubsub.message WHERE channel = 'chaos_work'"
                ).fetchall()
            )
