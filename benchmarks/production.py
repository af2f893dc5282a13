"""Durable channels under production conditions (issue 26), side by side in one run.

    python -m pip install -e '.[bench,peers]'
    python benchmarks/production.py [--only publishers paced bursts long-tx] [--sustained MINUTES]

Uses ``$PGPUBSUB_DSN`` or starts an embedded server. Every worker is a
``pgpubsub listen`` process importing this module; its listener writes one row
(the message's number and the time it started) in the claim transaction.
Publish-to-start latency is that start time minus the time the publisher's
commit returned (both clocks of this host).

* publishers: 8 threads, each committing single-message publishes on its own
  connection for 10 s: (a) the same INSERTs into a copy of pgpubsub.message,
  no NOTIFY; (b0) pgpubsub with no worker running; (b) pgpubsub with the new
  wake-ups (a NOTIFY only to a sleeping worker), a worker consuming; (c) the
  same with a NOTIFY per publish (``pgpubsub.wake`` dropped, restored after).
* paced: a worker with ``concurrency=32``, 4 publisher threads pacing 50 and
  then 400 messages/s for 20 s each: latency p50/p99 and the worker's busy
  backends (pg_stat_activity, state 'active', sampled every 50 ms); then
  pgqueuer with 32 concurrent jobs, the same pacing, in the same run.
* bursts: bursts of 16 messages in one transaction every 0.25 s for 10 s, to a
  worker with ``concurrency=32`` (pgqueuer: 32 concurrent jobs) whose jobs do
  nothing or sleep 5 ms after recording their start: latency p50/p99.
* long-tx: 2 worker processes drain 80,000 messages published in chunks of
  10,000, without and then with another session idle in a REPEATABLE READ
  transaction that ran a SELECT (it holds the xmin horizon): the rate per
  chunk, and pgpubsub.message's size and dead tuples after each; each without
  and with a VACUUM after each chunk (autovacuum's naptime, 1 min, is longer
  than these runs).
* ``--held-minutes MINUTES`` (by hand): the long-tx row drained chunk after
  chunk for that long, clean and held (no VACUUMs): the first and last
  minute's rates and the table's size and dead tuples at the start and end.
* ``--sustained MINUTES`` (by hand): 2 worker processes, a publisher at 60% of
  their measured drain rate (or ``--rate``) in transactions of a tenth of a
  second's messages: rate in the first and last minute, peak dead tuples and
  size of the pgpubsub tables, WAL bytes and commits per message.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).parent))

from durable import scalar, worker_env  # noqa: E402
from peers import conninfo_to_url  # noqa: E402

import pgpubsub  # noqa: E402
from pgpubsub import durable  # noqa: E402
from pgpubsub.channel import Channel  # noqa: E402
from pgpubsub.durable import connection  # noqa: E402

HERE = Path(__file__).parent

WORKER_APP = "prod_worker"  # the application_name of pgpubsub's worker connections
PGQUEUER_APP = "prod_pgqueuer"
STARTED_SQL = "INSERT INTO prod_starts (n, started) VALUES (%s, %s)"


@dataclass
class ProdJob(Channel, name="prod_job", lock_notifications=True):
    n: int


@dataclass
class ProdJob32(Channel, name="prod_job32", lock_notifications=True, concurrency=32):
    n: int


@pgpubsub.listener(ProdJob)
def on_job(n: int) -> None:
    # The effect, in the claim transaction: when this listener started.
    connection().execute(STARTED_SQL, (n, time.time()))


# The work each job of the bursts row does after its start is recorded (seconds).
WORK = float(os.environ.get("PROD_WORK", "0"))


@pgpubsub.listener(ProdJob32)
def on_job32(n: int) -> None:
    connection().execute(STARTED_SQL, (n, time.time()))
    if WORK:
        time.sleep(WORK)


# (a): the very INSERT a durable publish sends, into a copy of the table, no wake-up.
PLAIN_SQL = durable.STORE_SQL.replace("pgpubsub.message", "prod_plain").replace(
    "pgpubsub.wake(%s)", "%s::text IS NULL"
)


# -- helpers -----------------------------------------------------------------


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def reset(dsn: str) -> None:
    """Empty queue and effects (no worker may be running)."""
    execute(
        dsn,
        "CREATE TABLE IF NOT EXISTS prod_starts (n bigint, started float8)",
        "CREATE TABLE IF NOT EXISTS prod_plain (LIKE pgpubsub.message INCLUDING ALL)",
        "TRUNCATE pgpubsub.message, prod_starts, prod_plain",
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_for(dsn: str, query: str, at_least: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while scalar(dsn, query) < at_least:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextmanager
def worker(dsn: str, channel: type[Channel], processes: int = 1) -> Iterator[None]:
    """A ``pgpubsub listen`` process running ``channel`` of this module, started and ready."""
    env = worker_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpubsub", "listen", "production", "--processes", str(processes),
         "--channels", f"production.{channel.__name__}", "--log-level", "WARNING",
         "--dsn", make_conninfo(dsn, application_name=WORKER_APP)],
        env=env,
    )  # fmt: skip
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(processes):
                pgpubsub.notify(channel(n=-1), conn=conn)  # type: ignore[call-arg]
        ready = wait_for(dsn, "SELECT count(*) FROM prod_starts WHERE n < 0", processes, 60)
        assert ready, "the worker did not start"
        time.sleep(1.0)  # every process up and asleep
        execute(dsn, "DELETE FROM prod_starts WHERE n < 0")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def publish(
    dsn: str,
    threads: int,
    seconds: float,
    send: Callable[[Any, int], None],
    rate: float = 0.0,
    autocommit: bool = False,
) -> dict[int, float]:
    """``threads`` publishers, each on its own connection, for ``seconds``.

    ``send(conn, n)`` publishes and commits message ``n``; ``rate`` (total per
    second, 0: as fast as they can) paces them on a fixed schedule. Returns each
    message's commit time (time.time() once its commit returned).
    """
    committed: dict[int, float] = {}
    start = threading.Barrier(threads + 1)
    t0 = [0.0]

    def run(index: int) -> None:
        mine: dict[int, float] = {}
        with psycopg.connect(dsn, autocommit=autocommit) as conn:
            start.wait()
            k = 0
            while True:
                now = time.monotonic()
                if now - t0[0] >= seconds:
                    break
                if rate:
                    due = t0[0] + (k * threads + index) / rate
                    if due > now:
                        time.sleep(due - now)
                        continue
                n = index * 10_000_000 + k
                send(conn, n)
                mine[n] = time.time()
                k += 1
        committed.update(mine)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    t0[0] = time.monotonic()
    start.wait()
    for w in workers:
        w.join()
    return committed


def latencies(dsn: str, committed: dict[int, float], timeout: float = 60) -> list[float]:
    """Publish-to-start of each message in ms, once all started (or ``timeout``)."""
    wait_for(dsn, "SELECT count(*) FROM prod_starts WHERE n >= 0", len(committed), timeout)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT n, started FROM prod_starts WHERE n >= 0").fetchall()
    late = [(started - committed[n]) * 1000 for n, started in rows if n in committed]
    if len(late) < len(committed):
        print(f"  ({len(committed) - len(late)} of {len(committed)} not started after {timeout} s)")
    return late


def fmt_latency(late: list[float]) -> str:
    if not late:
        return "n/a"
    return f"{pct(late, 0.5):.1f} / {pct(late, 0.99):.1f}"


class Sampler:
    """Counts the active backends of ``application_name`` every ``every`` seconds."""

    def __init__(self, dsn: str, application_name: str, every: float = 0.05) -> None:
        self.dsn, self.name, self.every = dsn, application_name, every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        query = (
            "SELECT count(*) FROM pg_catalog.pg_stat_activity "
            "WHERE application_name = %s AND state = 'active'"
        )
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.wait(self.every):
                row = conn.execute(query, (self.name,)).fetchone()
                self.samples.append(int(row[0]) if row else 0)

    def summary(self) -> str:
        if not self.samples:
            return "n/a"
        return f"{statistics.mean(self.samples):.2f} / {max(self.samples)}"


def send_pgpubsub(channel: type[Channel]) -> Callable[[Any, int], None]:
    def send(conn: Any, n: int) -> None:
        pgpubsub.notify(channel(n=n), conn=conn)  # type: ignore[call-arg]
        conn.commit()

    return send


def send_plain(conn: Any, n: int) -> None:
    conn.execute(PLAIN_SQL, ("prod_job", json.dumps({"n": n}), "prod_job"))
    conn.commit()


# -- 1. publishers -----------------------------------------------------------


def row_publishers(dsn: str, seconds: float = 10, threads: int = 8) -> None:
    print(f"\n== 1. {threads} publishers of single-message transactions, {seconds:.0f} s each")
    print(
        "| publishers | commits/s | vs (a) | publish-to-start p50 / p99 (ms) "
        "| started while publishing /s |"
    )
    print("|---|---:|---:|---:|---:|")
    base = 0.0

    def kept_up(committed: dict[int, float]) -> int:
        """Messages whose listener started before the last publish committed."""
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM prod_starts WHERE n >= 0 AND started <= %s",
                (max(committed.values()),),
            ).fetchone()
        return int(row[0]) if row else 0

    def line(label: str, committed: dict[int, float], late: list[float] | None) -> None:
        nonlocal base
        rate = len(committed) / seconds
        base = base or rate
        shown, kept = (
            (fmt_latency(late), f"{kept_up(committed) / seconds:,.0f}") if late else ("", "")
        )
        print(f"| {label} | {rate:,.0f} | x{rate / base:.2f} | {shown} | {kept} |")
        sys.stdout.flush()

    reset(dsn)
    line("(a) the same INSERTs, no NOTIFY", publish(dsn, threads, seconds, send_plain), None)
    reset(dsn)
    send = send_pgpubsub(ProdJob)
    line("(b0) pgpubsub, no worker running", publish(dsn, threads, seconds, send), None)
    reset(dsn)
    with worker(dsn, ProdJob):
        committed = publish(dsn, threads, seconds, send)
        line("(b) pgpubsub, wake-ups to a sleeping worker", committed, latencies(dsn, committed))
    reset(dsn)
    execute(dsn, "DROP FUNCTION pgpubsub.wake(text) CASCADE")
    try:
        with worker(dsn, ProdJob):
            committed = publish(dsn, threads, seconds, send)
            line("(c) pgpubsub, a NOTIFY per publish (old)", committed, latencies(dsn, committed))
    finally:
        durable.migrate(dsn)


# -- 2. paced load -----------------------------------------------------------


def pgqueuer_worker(dsn: str) -> None:
    """The pgqueuer worker process: 32 concurrent jobs, each records its start."""
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job

    async def main() -> None:
        import asyncpg

        conn = await asyncpg.connect(
            conninfo_to_url(dsn), server_settings={"application_name": PGQUEUER_APP}
        )
        pgq = PgQueuer(AsyncpgDriver(conn))
        # The effect on a connection of its own (as pgqueuer's documents do), not sampled.
        writer = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name="prod_writer"
        )

        @pgq.entrypoint("prod_job", concurrency_limit=32)
        async def job(j: Job) -> None:
            started = time.time()
            await writer.execute(STARTED_SQL, (int(j.payload or b"0"), started))
            if WORK:
                await asyncio.sleep(WORK)

        await pgq.run(max_concurrent_tasks=32)

    asyncio.run(main())


def install_pgqueuer(dsn: str) -> None:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    if scalar(dsn, "SELECT (pg_catalog.to_regclass('pgqueuer') IS NOT NULL)::int"):
        return

    async def main() -> None:
        import asyncpg

        conn = await asyncpg.connect(conninfo_to_url(dsn))
        await Queries(AsyncpgDriver(conn)).install()
        await conn.close()

    asyncio.run(main())


@contextmanager
def pgqueuer_process(dsn: str) -> Iterator[Callable[[Any, int], None]]:
    from pgqueuer.db import SyncPsycopgDriver
    from pgqueuer.queries import SyncQueries

    def send(conn: Any, n: int) -> None:
        SyncQueries(SyncPsycopgDriver(conn)).enqueue("prod_job", str(n).encode())

    install_pgqueuer(dsn)
    env = dict(os.environ, PROD_PGQUEUER_DSN=dsn)
    proc = subprocess.Popen([sys.executable, __file__, "--pgqueuer-worker"], env=env)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            send(conn, -1)
        ready = wait_for(dsn, "SELECT count(*) FROM prod_starts WHERE n < 0", 1, 60)
        assert ready, "the pgqueuer worker did not start"
        time.sleep(1.0)
        execute(dsn, "DELETE FROM prod_starts WHERE n < 0")
        yield send
    finally:
        proc.terminate()
        proc.wait(30)


def row_paced(dsn: str, rates: tuple[int, ...] = (50, 400), seconds: float = 20) -> None:
    print(f"\n== 2. paced load, 32 concurrent processors/jobs, 4 publishers, {seconds:.0f} s each")
    print("| worker | messages/s | publish-to-start p50 / p99 (ms) | busy backends mean / max |")
    print("|---|---:|---:|---:|")

    def run(label: str, app: str, send: Callable[[Any, int], None], auto: bool) -> None:
        for rate in rates:
            execute(dsn, "TRUNCATE prod_starts")
            with Sampler(dsn, app) as busy:
                committed = publish(dsn, 4, seconds, send, rate=rate, autocommit=auto)
                late = latencies(dsn, committed)
            print(f"| {label} | {rate} | {fmt_latency(late)} | {busy.summary()} |")
            sys.stdout.flush()

    reset(dsn)
    with worker(dsn, ProdJob32):
        run("pgpubsub, concurrency=32", WORKER_APP, send_pgpubsub(ProdJob32), False)
    reset(dsn)
    with pgqueuer_process(dsn) as send:
        run("pgqueuer, 32 concurrent jobs", PGQUEUER_APP, send, True)


def row_bursts(
    dsn: str, works: tuple[float, ...] = (0.0, 0.005), size: int = 16, seconds: float = 10
) -> None:
    """Bursts of ``size`` messages in one transaction every 0.25 s, to a worker with
    ``concurrency=32`` whose jobs work ``works`` seconds each after their start."""
    print(f"\n== 2b. bursts of {size} messages every 0.25 s for {seconds:.0f} s, 32 concurrent")
    print("| worker | work a job (ms) | publish-to-start p50 / p99 (ms) |")
    print("|---|---:|---:|")

    def burst(label: str, send: Callable[[Any, range], None], work: float) -> None:
        """``send(conn, ns)`` publishes messages ``ns`` in one statement (autocommit)."""
        execute(dsn, "TRUNCATE prod_starts")
        committed: dict[int, float] = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            t0 = time.monotonic()
            for b in range(int(seconds * 4)):
                ns = range(b * size, (b + 1) * size)
                send(conn, ns)
                committed.update(dict.fromkeys(ns, time.time()))
                time.sleep(max(0.0, t0 + (b + 1) * 0.25 - time.monotonic()))
        print(f"| {label} | {work * 1000:g} | {fmt_latency(latencies(dsn, committed))} |")
        sys.stdout.flush()

    from pgqueuer.db import SyncPsycopgDriver
    from pgqueuer.queries import SyncQueries

    def store(conn: Any, ns: range) -> None:
        pgpubsub.notify_many(ProdJob32, [{"n": n} for n in ns], conn=conn)

    def enqueue(conn: Any, ns: range) -> None:
        payloads: list[bytes | None] = [str(n).encode() for n in ns]
        priorities = [0] * len(ns)
        SyncQueries(SyncPsycopgDriver(conn)).enqueue(["prod_job"] * len(ns), payloads, priorities)

    for work in works:
        os.environ["PROD_WORK"] = str(work)  # the worker processes' jobs
        reset(dsn)
        with worker(dsn, ProdJob32):
            burst("pgpubsub, concurrency=32", store, work)
        reset(dsn)
        with pgqueuer_process(dsn):
            burst("pgqueuer, 32 concurrent jobs", enqueue, work)


# -- 3. a long transaction ---------------------------------------------------

# pgpubsub.message and, should it be partitioned, its partitions (message_...).
SIZE_SQL = (
    "SELECT coalesce(sum(pg_catalog.pg_total_relation_size(relid)), 0) "
    "FROM pg_catalog.pg_stat_user_tables "
    "WHERE schemaname = 'pgpubsub' AND relname ~ '^message(_|$)'"
)
DEAD_SQL = (
    "SELECT coalesce(sum(n_dead_tup), 0) FROM pg_catalog.pg_stat_user_tables "
    "WHERE schemaname = 'pgpubsub' AND relname ~ '^message(_|$)'"
)
# How often autovacuum has vacuumed and analyzed it, as vacuums * 1000 + analyzes.
AUTO_SQL = (
    "SELECT coalesce(sum(autovacuum_count * 1000 + autoanalyze_count), 0) "
    "FROM pg_catalog.pg_stat_user_tables "
    "WHERE schemaname = 'pgpubsub' AND relname ~ '^message(_|$)'"
)


class Chunk(NamedTuple):
    """One drained chunk of :func:`drain_chunks`."""

    rate: float  # messages/s
    size: int  # the message tables' bytes after it
    dead: int  # their dead tuples
    auto: int  # AUTO_SQL
    at: float  # seconds since the first chunk was published


def drain_chunks(
    dsn: str, chunks: int, chunk: int, hold: bool, vacuum: bool, seconds: float = 0.0
) -> list[Chunk]:
    """Per chunk: its rate, the message tables' size and dead tuples after it, and more.

    ``vacuum``: a VACUUM after each chunk (untimed), the chance autovacuum gets
    between chunks in production. ``seconds``: chunks go on until that long has
    passed (``chunks`` ignored). The listener's rows are emptied after each
    chunk, so that counting them costs the same at the end as at the start.
    """
    reset(dsn)
    out = []
    with worker(dsn, ProdJob, processes=2):
        holder = psycopg.connect(dsn)
        try:
            if hold:
                holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                # takes the snapshot (a query of another table: a report elsewhere)
                holder.execute("SELECT count(*) FROM pg_catalog.pg_class")
                held = scalar(
                    dsn,
                    "SELECT count(*) FROM pg_catalog.pg_stat_activity "
                    "WHERE state = 'idle in transaction' AND backend_xmin IS NOT NULL",
                )
                assert held, "the idle transaction holds no snapshot"
            start = time.monotonic()
            for c in itertools.count():
                if (time.monotonic() - start >= seconds) if seconds else c == chunks:
                    break
                rows = [{"n": c * chunk + i} for i in range(chunk)]
                with psycopg.connect(dsn) as conn:
                    pgpubsub.notify_many(ProdJob, rows, conn=conn)
                    conn.commit()
                    t0 = time.perf_counter()
                assert wait_for(dsn, "SELECT count(*) FROM prod_starts", chunk, 300)
                rate = chunk / (time.perf_counter() - t0)
                execute(dsn, "TRUNCATE prod_starts")
                time.sleep(1.2)  # backends report their table statistics within a second
                if vacuum:
                    execute(dsn, "VACUUM pgpubsub.message")
                stats = [scalar(dsn, query) for query in (SIZE_SQL, DEAD_SQL, AUTO_SQL)]
                out.append(Chunk(rate, *stats, time.monotonic() - start))
        finally:
            holder.close()
    return out


LONG_TX_RUNS = (  # label, an idle transaction held, a VACUUM after each chunk
    ("clean", False, False),
    ("clean, VACUUM", False, True),
    ("held", True, False),
    ("held, VACUUM", True, True),
)


def row_long_tx(dsn: str, chunks: int = 8, chunk: int = 10_000) -> None:
    print(
        f"\n== 3. 2 worker processes drain {chunks * chunk:,} messages in chunks of {chunk:,}; "
        "held: beside a session idle in a transaction; VACUUM: one after each chunk"
    )
    runs = {label: drain_chunks(dsn, chunks, chunk, hold, vac) for label, hold, vac in LONG_TX_RUNS}
    print(
        "messages/s, then pgpubsub.message's size (MB) and dead tuples after the chunk, "
        "and how often autovacuum had vacuumed/analyzed it (when it had)"
    )
    print("| processed | " + " | ".join(runs) + " |")
    print("|---:|" + "---:|" * len(runs))
    for c in range(chunks):
        cells = [
            f"{r[c][0]:,.0f} · {r[c][1] / 2**20:.1f} MB · {r[c][2]:,}"
            + (f" · auto {r[c][3] // 1000}/{r[c][3] % 1000}" if r[c][3] else "")
            for r in runs.values()
        ]
        print(f"| {(c + 1) * chunk:,} | " + " | ".join(cells) + " |")
    for label, r in runs.items():
        print(f"{label}: last chunk vs first x{r[-1][0] / r[0][0]:.2f}", end="; ")
    print()
    for held, clean in (("held", "clean"), ("held, VACUUM", "clean, VACUUM")):
        ratio = statistics.mean(x[0] for x in runs[held]) / statistics.mean(
            x[0] for x in runs[clean]
        )
        print(f"{held} vs {clean}, mean rate: x{ratio:.2f}")


def row_long_tx_timed(dsn: str, minutes: float, chunk: int = 10_000) -> None:
    """Chunks drained for ``minutes``, clean and then beside a session idle in a transaction."""
    print(
        f"\n== 3b. 2 worker processes drain chunks of {chunk:,} for {minutes:g} minutes; "
        "held: beside a session idle in a REPEATABLE READ transaction for the whole run"
    )
    runs = {
        label: drain_chunks(dsn, 0, chunk, hold, False, minutes * 60)
        for label, hold in (("clean", False), ("held", True))
    }

    def last_minute(r: list[Chunk]) -> float:
        return statistics.mean(x.rate for x in r if x.at >= r[-1].at - 60)

    for label, r in runs.items():
        print(
            f"{label}: {len(r) * chunk:,} messages; first minute "
            f"{statistics.mean(x.rate for x in r if x.at <= 60):,.0f}/s, last minute "
            f"{last_minute(r):,.0f}/s; message tables "
            f"{r[0].size / 2**20:.1f} MB and {r[0].dead:,} dead tuples after the first chunk, "
            f"{r[-1].size / 2**20:.1f} MB and {r[-1].dead:,} after the last"
        )
    ratio = last_minute(runs["held"]) / last_minute(runs["clean"])
    print(f"held vs clean, last minute: x{ratio:.2f}")


# -- 4. sustained ------------------------------------------------------------


def row_sustained(dsn: str, minutes: float, rate: float = 0.0) -> None:
    reset(dsn)
    with worker(dsn, ProdJob, processes=2):
        if not rate:  # calibrate: the workers' drain rate over a backlog
            n = 20_000
            with psycopg.connect(dsn) as conn:
                pgpubsub.notify_many(ProdJob, [{"n": i} for i in range(n)], conn=conn)
                conn.commit()
                t0 = time.perf_counter()
            wait_for(dsn, "SELECT count(*) FROM prod_starts", n, 300)
            rate = 0.6 * n / (time.perf_counter() - t0)  # publishing takes CPU too
        print(f"\n== 4. sustained: {rate:,.0f} messages/s for {minutes:g} minutes, 2 processes")
        execute(dsn, "TRUNCATE prod_starts", "VACUUM ANALYZE pgpubsub.message")
        seconds = minutes * 60
        published = [0]
        stop = threading.Event()

        def publisher() -> None:
            per = max(1, round(rate / 10))
            with psycopg.connect(dsn) as conn:
                t0 = time.monotonic()
                k = 0
                while not stop.is_set():
                    rows = [{"n": k * per + i} for i in range(per)]
                    pgpubsub.notify_many(ProdJob, rows, conn=conn)
                    conn.commit()
                    published[0] += per
                    k += 1
                    stop.wait(max(0.0, t0 + k / 10 - time.monotonic()))

        stats = (
            "SELECT pg_catalog.pg_current_wal_lsn()::text, "
            "(SELECT xact_commit FROM pg_catalog.pg_stat_database "
            "WHERE datname = pg_catalog.current_database())"
        )
        tables = (
            "SELECT coalesce(sum(n_dead_tup), 0), "
            "coalesce(sum(pg_catalog.pg_total_relation_size(relid)), 0) "
            "FROM pg_catalog.pg_stat_user_tables WHERE schemaname = 'pgpubsub'"
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            lsn0, commits0 = conn.execute(stats).fetchone()  # type: ignore[misc]
            thread = threading.Thread(target=publisher)
            thread.start()
            t0 = time.monotonic()
            processed: list[tuple[float, int]] = []
            peak_dead = peak_size = 0
            while time.monotonic() - t0 < seconds:
                time.sleep(1.0)
                pending = conn.execute("SELECT count(*) FROM pgpubsub.message").fetchone()
                dead, size = conn.execute(tables).fetchone()  # type: ignore[misc]
                processed.append((time.monotonic() - t0, published[0] - int(pending[0])))  # type: ignore[index]
                peak_dead, peak_size = max(peak_dead, int(dead)), max(peak_size, int(size))
            stop.set()
            thread.join()
            lsn1, commits1 = conn.execute(stats).fetchone()  # type: ignore[misc]
            wal = conn.execute(
                "SELECT pg_catalog.pg_wal_lsn_diff(%s, %s)", (lsn1, lsn0)
            ).fetchone()[0]  # type: ignore[index]

    def rate_between(a: float, b: float) -> float:
        inside = [(t, p) for t, p in processed if a <= t <= b]
        (ta, pa), (tb, pb) = inside[0], inside[-1]
        return (pb - pa) / (tb - ta)

    end = processed[-1][0]
    first, last = rate_between(0, min(60, end)), rate_between(max(0, end - 60), end)
    total = processed[-1][1]
    print(
        f"published {published[0]:,}, processed {total:,}, "
        f"pending at the end {published[0] - total:,}"
    )
    print(f"rate, first minute: {first:,.0f}/s; last minute: {last:,.0f}/s (x{last / first:.2f})")
    print(f"pgpubsub tables, peak: {peak_dead:,} dead tuples, {peak_size / 2**20:.1f} MB")
    print(
        f"WAL: {float(wal) / total:,.0f} bytes per message; "
        f"commits per message: {(commits1 - commits0) / total:.2f}"
    )


# -- main --------------------------------------------------------------------

ROWS = ("publishers", "paced", "bursts", "long-tx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--sustained", type=float, metavar="MINUTES", default=0.0)
    parser.add_argument("--rate", type=float, default=0.0, help="--sustained's publish rate")
    parser.add_argument("--held-minutes", type=float, metavar="MINUTES", default=0.0)
    parser.add_argument("--pgqueuer-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pgqueuer_worker:
        pgqueuer_worker(os.environ["PROD_PGQUEUER_DSN"])
        return
    dsn = os.environ.get("PGPUBSUB_DSN")
    server = None
    if not dsn:
        from pgpubsub.embedded import EmbeddedServer

        server = EmbeddedServer().start()
        dsn = server.conninfo
    try:
        durable.migrate(dsn)
        with psycopg.connect(dsn) as conn:
            print(f"server: PostgreSQL {conn.info.server_version}, {os.cpu_count()} cores")
        if args.sustained:
            row_sustained(dsn, args.sustained, args.rate)
            return
        if args.held_minutes:
            row_long_tx_timed(dsn, args.held_minutes)
            return
        if "publishers" in args.only:
            row_publishers(dsn)
        if "paced" in args.only:
            row_paced(dsn)
        if "bursts" in args.only:
            row_bursts(dsn)
        if "long-tx" in args.only:
            row_long_tx(dsn)
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
