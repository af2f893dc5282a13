"""Delivery benchmark: pgpubsub's listeners beside the raw drivers, in one run.

    python -m pip install -e '.[bench]'
    python benchmarks/delivery.py [--n 100000] [--latency 1000] [--memory 1000000]

Uses ``$PGPUBSUB_DSN`` or starts an embedded server. For each contestant:

* end-to-end: a publisher in its own process sends N notifications in
  transactions of 1000 while the listener runs; rate = N / (first send to last
  receipt); CPU = the listener process's CPU time per message;
* drain: N notifications queued in the server first (one transaction), timed
  from the first message received to the last.

Every payload is the JSON of the ``Tick`` channel; the typed contestants (P2)
decode it into the dataclass and call an ``@listener`` with its fields.

Then latency at 500 msg/s (p50/p99, raw psycopg 3 and pgpubsub) and memory
over a long stream through pgpubsub (RSS growth). Every handler does the same
trivial work (count, check for the end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from pgpubsub import Channel, Engine, Listener, Notify
from pgpubsub.embedded import EmbeddedServer
from pgpubsub.listen import Registry
from pgpubsub.worker import Worker

CHANNEL = "bench"
PUBLISH_SQL = "SELECT pg_notify(%s, x) FROM unnest(%b::text[]) AS x"


@dataclass
class Tick(Channel, name=CHANNEL):
    """The payload every contestant receives; typed contestants decode it into this."""

    seq: int
    note: str


# -- publisher (runs in its own process) ----------------------------------------


def publisher(dsn: str, n: int, rate: float) -> None:
    with psycopg.connect(dsn) as conn:
        print("ready", flush=True)
        sys.stdin.readline()
        if rate:  # paced, one per transaction, payload = send time in ns
            interval = 1 / rate
            start = time.perf_counter()
            for i in range(n):
                while time.perf_counter() < start + i * interval:
                    pass
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(time.time_ns())))
                conn.commit()
            return
        for lo in range(0, n, 1000):
            payloads = [f'{{"seq":{i},"note":"x"}}' for i in range(lo, min(n, lo + 1000))]
            conn.execute(PUBLISH_SQL, (CHANNEL, payloads))
            conn.commit()


class Publisher:
    def __init__(self, dsn: str, n: int, rate: float = 0):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--publish", dsn, str(n), str(rate)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout and self.proc.stdout.readline().strip() == "ready"

    def go(self) -> float:
        assert self.proc.stdin
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return time.perf_counter()

    def wait(self) -> None:
        self.proc.wait(60)


def queue_in_server(dsn: str, n: int) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "SELECT pg_notify(%s, json_build_object('seq', i, 'note', 'x')::text) "
            "FROM generate_series(1, %s) AS i",
            (CHANNEL, n),
        )


class Result:
    def __init__(self, name: str, n: int, seconds: float, cpu: float):
        self.name, self.n, self.seconds, self.cpu = name, n, seconds, cpu

    @property
    def rate(self) -> float:
        return self.n / self.seconds


# -- the contestants: each is "listen, then run(start_signal) until n received" --


def raw_psycopg2(dsn: str, n: int, drain: bool) -> Result:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.set_session(autocommit=True)
    conn.cursor().execute(f'LISTEN "{CHANNEL}"')
    pub = None if drain else Publisher(dsn, n)
    if drain:
        queue_in_server(dsn, n)
    count = 0
    cpu0 = time.process_time()
    t0 = pub.go() if pub else None
    while count < n:
        select.select([conn], [], [], 5)
        conn.poll()
        if t0 is None:
            t0 = time.perf_counter()
        notes = conn.notifies
        for note in notes:
            if note.payload is not None:
                count += 1
        del notes[:]
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    conn.close()
    if pub:
        pub.wait()
    return Result("raw psycopg2 poll loop", n, seconds, cpu)


def raw_psycopg3(dsn: str, n: int, drain: bool) -> Result:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(f'LISTEN "{CHANNEL}"')
    pgconn = conn.pgconn
    pub = None if drain else Publisher(dsn, n)
    if drain:
        queue_in_server(dsn, n)
    count = 0
    cpu0 = time.process_time()
    t0 = pub.go() if pub else None
    while count < n:
        select.select([pgconn.socket], [], [], 5)
        pgconn.consume_input()
        if t0 is None:
            t0 = time.perf_counter()
        note = pgconn.notifies()
        while note is not None:
            if note.extra.decode() is not None:
                count += 1
            note = pgconn.notifies()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    conn.close()
    if pub:
        pub.wait()
    return Result("raw psycopg 3 pgconn.notifies()", n, seconds, cpu)


def raw_asyncpg(dsn: str, n: int, drain: bool) -> Result:
    import asyncpg

    async def main() -> Result:
        p = psycopg.conninfo.conninfo_to_dict(dsn)
        conn = await asyncpg.connect(
            host=p.get("host"), port=p.get("port"), user=p.get("user"), database=p.get("dbname")
        )
        done = asyncio.Event()
        count = 0
        t0: float | None = None

        def on_note(_c: Any, _pid: int, _ch: str, payload: str) -> None:
            nonlocal count, t0
            if t0 is None:
                t0 = time.perf_counter()
            count += 1
            if count == n:
                done.set()

        pub = None if drain else Publisher(dsn, n)
        if drain:
            # Hold the reader back while the server queues everything.
            await conn.add_listener(CHANNEL, on_note)
            conn._transport.pause_reading()
            queue_in_server(dsn, n)
            cpu0 = time.process_time()
            conn._transport.resume_reading()
        else:
            await conn.add_listener(CHANNEL, on_note)
            cpu0 = time.process_time()
            t0 = pub.go() if pub else None
        await asyncio.wait_for(done.wait(), 120)
        assert t0 is not None
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await conn.close()
        if pub:
            pub.wait()
        return Result("raw asyncpg add_listener", n, seconds, cpu)

    return asyncio.run(main())


def pgpubsub_engine(label: str, batch: bool, thread: bool, api: str = "engine"):  # type: ignore[no-untyped-def]
    def contestant(dsn: str, n: int, drain: bool) -> Result:
        async def main() -> Result:
            done = asyncio.Event()
            loop = asyncio.get_running_loop()
            count = 0
            t0: float | None = None

            def finish() -> None:
                if thread:
                    loop.call_soon_threadsafe(done.set)
                else:
                    done.set()

            handler: Callable[..., Any]
            if batch:

                def handler(msgs: list[Notify]) -> None:
                    nonlocal count, t0
                    if t0 is None:
                        t0 = time.perf_counter()
                    count += len(msgs)
                    if count >= n:
                        finish()
            elif api == "listener":

                async def handler(_conn: Any, payload: str, channel: str, pid: int) -> None:
                    nonlocal count, t0
                    if t0 is None:
                        t0 = time.perf_counter()
                    count += 1
                    if count == n:
                        finish()
            elif thread:

                def handler(msg: Notify) -> None:
                    nonlocal count, t0
                    if t0 is None:
                        t0 = time.perf_counter()
                    count += 1
                    if count == n:
                        finish()
            else:

                async def handler(msg: Notify) -> None:
                    nonlocal count, t0
                    if t0 is None:
                        t0 = time.perf_counter()
                    count += 1
                    if count == n:
                        finish()

            if api == "listener":
                listener = Listener(dsn)
                await listener.add_callback(CHANNEL, handler)
                await listener.startup()
                start: Callable[[], None] = listener.listen
                stop: Callable[[], Awaitable[None]] = listener.shutdown
            else:
                engine = Engine(dsn)
                await engine.subscribe(CHANNEL, handler, batch=batch, thread=thread)
                await engine.start()
                engine.pause()
                start, stop = engine.resume, engine.stop
            pub = None if drain else Publisher(dsn, n)
            if drain:
                queue_in_server(dsn, n)
            cpu0 = time.process_time()
            start()
            if pub:
                t0 = pub.go()
            await asyncio.wait_for(done.wait(), 120)
            assert t0 is not None
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            await stop()
            if pub:
                pub.wait()
            return Result(label, n, seconds, cpu)

        return asyncio.run(main())

    return contestant


def pgpubsub_typed(label: str, is_async: bool):  # type: ignore[no-untyped-def]
    """A Worker running an @listener of the Tick channel: payloads decoded into Tick."""

    def contestant(dsn: str, n: int, drain: bool) -> Result:
        async def main() -> Result:
            done = asyncio.Event()
            loop = asyncio.get_running_loop()
            count = 0
            t0: float | None = None
            registry = Registry()

            def tick() -> None:
                nonlocal count, t0
                if t0 is None:
                    t0 = time.perf_counter()
                count += 1
                if count == n:
                    loop.call_soon_threadsafe(done.set)

            if is_async:

                async def on_tick(seq: int, note: str) -> None:
                    tick()

                registry.add(Tick, on_tick)
            else:
                registry.add(Tick, lambda seq, note: tick())
            worker = Worker(dsn, registry=registry)
            await worker.start()
            worker.engine.pause()
            pub = None if drain else Publisher(dsn, n)
            if drain:
                queue_in_server(dsn, n)
            cpu0 = time.process_time()
            worker.engine.resume()
            if pub:
                t0 = pub.go()
            await asyncio.wait_for(done.wait(), 120)
            assert t0 is not None
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            await worker.stop()
            if pub:
                pub.wait()
            return Result(label, n, seconds, cpu)

        return asyncio.run(main())

    return contestant


CONTESTANTS = [
    raw_psycopg2,
    raw_asyncpg,
    raw_psycopg3,
    pgpubsub_engine("pgpubsub Engine, async per-message handler", False, False),
    pgpubsub_engine("pgpubsub Engine, sync per-message handler (thread)", False, True),
    pgpubsub_engine("pgpubsub Listener callback (seed 001 API)", False, False, "listener"),
    pgpubsub_engine("pgpubsub Engine, batch handler", True, False),
    pgpubsub_typed("pgpubsub typed @listener (Tick dataclass), async", True),
    pgpubsub_typed("pgpubsub typed @listener (Tick dataclass), sync", False),
]


def throughput(dsn: str, n: int) -> None:
    for drain in (False, True):
        title = "drain (queued first)" if drain else "end-to-end (publisher process)"
        print(f"\n== {title}, {n:,} notifications")
        results = [c(dsn, n, drain) for c in CONTESTANTS]
        anchor, asyncpg = results[0].rate, results[1].rate
        for r in results:
            print(
                f"{r.name:<55} {r.rate:>11,.0f}/s  {r.cpu / r.n * 1e6:6.2f} µs CPU/msg"
                f"  x{r.rate / anchor:4.2f} vs psycopg2  x{r.rate / asyncpg:4.2f} vs asyncpg"
            )


# -- latency ------------------------------------------------------------------------


def latency(dsn: str, n: int) -> None:
    print(f"\n== latency at 500 msg/s, {n} messages (publisher process, same host)")

    def report(name: str, lat: list[int]) -> list[float]:
        us = sorted(x / 1000 for x in lat)
        p50, p99 = statistics.median(us), us[int(len(us) * 0.99) - 1]
        print(f"{name:<55} p50 {p50:7.1f} µs   p99 {p99:7.1f} µs")
        return [p50, p99]

    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(f'LISTEN "{CHANNEL}"')
    pgconn = conn.pgconn
    lat: list[int] = []
    pub = Publisher(dsn, n, 500)
    pub.go()
    while len(lat) < n:
        select.select([pgconn.socket], [], [], 5)
        pgconn.consume_input()
        note = pgconn.notifies()
        while note is not None:
            lat.append(time.time_ns() - int(note.extra))
            note = pgconn.notifies()
    pub.wait()
    conn.close()
    raw = report("raw psycopg 3", lat)

    async def ours() -> list[int]:
        got: list[int] = []
        done = asyncio.Event()

        async def handler(msg: Notify) -> None:
            got.append(time.time_ns() - int(msg.payload))
            if len(got) == n:
                done.set()

        engine = Engine(dsn)
        await engine.subscribe(CHANNEL, handler)
        await engine.start()
        pub = Publisher(dsn, n, 500)
        pub.go()
        await asyncio.wait_for(done.wait(), 60)
        await engine.stop()
        pub.wait()
        return got

    mine = report("pgpubsub Engine, async handler", asyncio.run(ours()))
    print(f"{'difference':<55} p50 {mine[0] - raw[0]:+7.1f} µs   p99 {mine[1] - raw[1]:+7.1f} µs")


# -- memory -------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(dsn: str, n: int) -> None:
    print(f"\n== memory over {n:,} messages through pgpubsub (end-to-end)")

    async def main() -> None:
        done = asyncio.Event()
        count = 0
        samples: list[float] = []

        async def handler(msg: Notify) -> None:
            nonlocal count
            count += 1
            if count % (n // 10) == 0:
                samples.append(rss_mb())
            if count == n:
                done.set()

        engine = Engine(dsn)
        await engine.subscribe(CHANNEL, handler)
        await engine.start()
        pub = Publisher(dsn, n)
        pub.go()
        await asyncio.wait_for(done.wait(), 600)
        await engine.stop()
        pub.wait()
        print("RSS MB at each tenth: " + " ".join(f"{s:.1f}" for s in samples))
        print(f"growth from first tenth to end: {samples[-1] - samples[0]:+.1f} MB")

    asyncio.run(main())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--publish":
        publisher(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--latency", type=int, default=1000)
    parser.add_argument("--memory", type=int, default=1_000_000)
    args = parser.parse_args()
    dsn = os.environ.get("PGPUBSUB_DSN")
    server = None if dsn else EmbeddedServer().start()
    try:
        dsn = dsn or server.conninfo  # type: ignore[union-attr]
        with psycopg.connect(dsn) as conn:
            print(f"server: PostgreSQL {conn.info.server_version}, {os.cpu_count()} cores")
        throughput(dsn, args.n)
        if args.latency:
            latency(dsn, args.latency)
        if args.memory:
            memory(dsn, args.memory)
    finally:
        if server:
            server.close()


if __name__ == "__main__":
    main()
