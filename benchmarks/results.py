"""Results benchmark (issue 29): completion to a waiting ``result()``, beside plain latency.

    python benchmarks/results.py [--n 300] [--waiters 10]

Uses ``$PGPUBSUB_DSN`` or starts an embedded server. One in-process worker
runs both channels, in the same run:

* plain: a typed plain channel; each message carries its send time (taken
  right after the autocommit NOTIFY returned), the listener notes its receipt:
  latency = receipt - send;
* results: a ``results=True`` durable channel whose listener sleeps 20 ms (so
  that its waiter is listening before it completes, as a caller awaiting
  real work is) and returns the time it finished; ``--waiters`` callers each
  publish and ``await handle.result()`` in turn: latency = result() returned -
  listener finished (the completion's COMMIT, its NOTIFY, the waiter's read).
  The connection each ``result()`` opens is before the completion here and
  not counted; publish -> listener start is printed apart. With one waiter
  each batch holds one message; with ``--waiters`` (10) batches hold several,
  and a message's result is visible at its batch's COMMIT, after its
  batch-mates' listeners (20 ms each) ran too.

Both as p50/p99 in milliseconds (one machine: one clock).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).parent))

import pgpubsub  # noqa: E402
from pgpubsub import durable  # noqa: E402
from pgpubsub._loopthread import LoopThread  # noqa: E402
from pgpubsub.channel import Channel  # noqa: E402
from pgpubsub.embedded import EmbeddedServer  # noqa: E402
from pgpubsub.listen import Registry  # noqa: E402
from pgpubsub.worker import Worker  # noqa: E402


@dataclass
class Ping(Channel, name="bench_results_plain"):
    sent: float


@dataclass
class Work(Channel, name="bench_results_work", lock_notifications=True, results=True):
    n: int


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   (n={len(ms)})"


def plain(dsn: str, n: int, received: list[float], done: threading.Event) -> list[float]:
    latencies: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(n):
            before = len(received)
            pgpubsub.notify(Ping, sent=time.time(), conn=conn)
            deadline = time.monotonic() + 5
            while len(received) == before and time.monotonic() < deadline:
                time.sleep(0.0005)
            time.sleep(0.002)  # ~500 msg/s at most: latency, not throughput
        done.set()
    latencies.extend(received)
    return latencies


async def results(dsn: str, n: int, waiters: int) -> tuple[list[float], list[float]]:
    latencies: list[float] = []
    connects: list[float] = []
    per = n // waiters

    async def caller() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for i in range(per):
                h = await pgpubsub.anotify(Work(n=i), conn=conn)
                started = time.time()
                value = await h.result(timeout=30)
                returned = time.time()
                latencies.append(returned - value["finished"])
                connects.append(value["started"] - started)

    await asyncio.gather(*(caller() for _ in range(waiters)))
    return latencies, connects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--waiters", type=int, default=10)
    args = parser.parse_args()
    dsn = os.environ.get("PGPUBSUB_DSN", "")
    server = None if dsn else EmbeddedServer().start()
    dsn = dsn or server.conninfo  # type: ignore[union-attr]
    os.environ["PGPUBSUB_DSN"] = dsn
    durable.migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM pgpubsub.message WHERE channel = 'bench_results_work'")

    registry = Registry()
    received: list[float] = []
    registry.add(Ping, lambda sent: received.append(time.time() - sent))

    def work(n: int) -> dict[str, Any]:
        started = time.time()
        time.sleep(0.02)
        return {"n": n, "started": started, "finished": time.time()}

    registry.add(Work, work)
    worker = Worker(dsn, registry=registry, register=False)
    loop = LoopThread("bench-worker")
    loop.run(worker.start(), timeout=30)
    try:
        print(f"== completion -> result(), beside plain latency ({args.n} messages each)")
        got = plain(dsn, args.n, received, threading.Event())
        print(f"plain channel (NOTIFY -> listener)          {percentiles(got)}")
        for waiters in sorted({1, args.waiters}):
            lat, connects = asyncio.run(results(dsn, args.n, waiters))
            print(f"results, {waiters:2d} waiter(s) (completion -> result()) {percentiles(lat)}")
            print(f"  publish -> listener start (result()'s connect): {percentiles(connects)}")
    finally:
        loop.run(worker.stop(), timeout=30)
        loop.close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
