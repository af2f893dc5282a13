"""Memory under a backlog (P9, scenario 16): a slow handler, a long pause, the heartbeat.

    python benchmarks/backpressure.py [--backlog 1000000] [--hold 30] [--bound 10000]

Uses ``$PGPUBSUB_DSN`` or starts an embedded server. For each mode (async
handler, sync handler in a thread, batch handler, Notifier, Listener) the
server is given ``--backlog`` notifications in one transaction, then a 10 ms
handler runs for ``--hold`` seconds with a 1 s heartbeat; meanwhile the
process's RSS and the messages it holds (``status().pending``) are sampled.
Then the engine is paused for ``--hold`` / 3 seconds (handlers called while
paused are counted) and resumed. Printed per mode: RSS growth, the most
messages held against the bound, handler calls while paused. The targets:
growth under 20 MB, held never above the bound, no call while paused. The
same run without pgpubsub's bound (psycopg 3 with a notify handler: each
heartbeat reads everything the server has sent) is printed for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import resource
import time
from typing import Any

import psycopg

from pgpubsub import Engine, Listener, Notifier
from pgpubsub._loopthread import LoopThread
from pgpubsub.embedded import EmbeddedServer


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def backlog(dsn: str, channel: str, n: int) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT pg_notify(%s, g::text) FROM generate_series(1, %s) g", (channel, n))


class Slow:
    def __init__(self) -> None:
        self.calls = 0
        self.paused = False
        self.while_paused = 0

    def __call__(self, *args: Any) -> None:
        self.calls += 1
        self.while_paused += self.paused
        time.sleep(0.01)

    def batch(self, msgs: list[Any]) -> None:
        """One handler call for a batch: a call already running when paused may finish."""
        self.calls += len(msgs)
        self.while_paused += self.paused
        time.sleep(0.01 * len(msgs))

    async def wait(self, *args: Any) -> None:
        self.calls += 1
        self.while_paused += self.paused
        await asyncio.sleep(0.01)


def measure(name: str, status: Any, pause: Any, resume: Any, slow: Slow, hold: float) -> None:
    base = rss_mb()
    peak_rss, peak_held = base, 0
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        peak_rss = max(peak_rss, rss_mb())
        peak_held = max(peak_held, status().pending)
        time.sleep(0.05)
    pause()
    slow.paused = True
    time.sleep(0.2)  # a call already running when pause() returned finishes
    slow.while_paused = 0
    deadline = time.monotonic() + hold / 3
    while time.monotonic() < deadline:
        peak_rss = max(peak_rss, rss_mb())
        peak_held = max(peak_held, status().pending)
        time.sleep(0.05)
    slow.paused = False
    resume()
    print(
        f"{name:<10} handled {slow.calls:>6,}  RSS +{peak_rss - base:5.1f} MB  "
        f"held max {peak_held:>6,}  calls while paused {slow.while_paused}"
    )


def run_engine(dsn: str, mode: str, args: argparse.Namespace) -> None:
    slow = Slow()
    loop = LoopThread()
    engine = Engine(dsn, max_pending=args.bound, heartbeat=1.0)

    handler = {"async": slow.wait, "thread": slow, "batch": slow.batch}
    loop.run(engine.subscribe("bp", handler[mode], batch=mode == "batch"))
    loop.run(engine.start())
    backlog(dsn, "bp", args.backlog)
    call = loop.loop.call_soon_threadsafe
    try:
        measure(
            mode,
            engine.status,
            lambda: call(engine.pause),
            lambda: call(engine.resume),
            slow,
            args.hold,
        )
    finally:
        loop.run(engine.stop(timeout=0.5))
        loop.close()


def run_notifier(dsn: str, args: argparse.Namespace) -> None:
    slow = Slow()
    n = Notifier(dsn, max_pending=args.bound, heartbeat=1.0)
    n.subscribe("me", "bp", slow)
    backlog(dsn, "bp", args.backlog)
    try:
        measure(
            "Notifier",
            n.status,
            lambda: n.mute_subscriber("me"),
            lambda: n.unmute_subscriber("me"),
            slow,
            args.hold,
        )
    finally:
        n.stop(timeout=0.5)


def run_listener(dsn: str, args: argparse.Namespace) -> None:
    slow = Slow()

    async def main() -> None:
        listener = Listener(dsn, max_pending=args.bound, heartbeat=1.0)
        await listener.add_callback("bp", slow.wait)
        await listener.startup()
        listener.listen()
        await asyncio.to_thread(backlog, dsn, "bp", args.backlog)
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(
            measure,
            "Listener",
            listener.status,
            lambda: loop.call_soon_threadsafe(listener.abort_listen),
            lambda: loop.call_soon_threadsafe(listener.listen),
            slow,
            args.hold,
        )
        await listener.shutdown()

    asyncio.run(main())


def run_unbounded(dsn: str, args: argparse.Namespace) -> None:
    """psycopg 3 with a notify handler and no bound: any command (here a 1 s heartbeat)
    reads every notification the server has sent into memory before it returns."""
    conn = psycopg.connect(dsn, autocommit=True)
    queue: collections.deque[psycopg.Notify] = collections.deque()
    conn.add_notify_handler(queue.append)
    conn.execute("LISTEN bp")
    backlog(dsn, "bp", args.backlog)
    base = rss_mb()
    peak = base
    deadline = time.monotonic() + args.hold
    next_beat = 0.0
    handled = 0
    held = 0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_beat:
            conn.execute("SELECT 1")  # the heartbeat: reads whatever the server has sent
            next_beat = time.monotonic() + 1.0
            peak = max(peak, rss_mb())
            held = max(held, len(queue))
        if queue:
            queue.popleft()
            handled += 1
        time.sleep(0.01)  # the 10 ms handler
    peak = max(peak, rss_mb())
    print(
        f"{'raw psycopg':<10} handled {handled:>6,}  RSS +{peak - base:5.1f} MB  "
        f"held max {held:>9,}  (no bound)"
    )
    conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backlog", type=int, default=1_000_000)
    p.add_argument("--hold", type=float, default=30.0)
    p.add_argument("--bound", type=int, default=10_000)
    args = p.parse_args()
    server = None
    dsn = os.environ.get("PGPUBSUB_DSN")
    if not dsn:
        server = EmbeddedServer().start()
        dsn = server.conninfo
    try:
        print(
            f"backlog {args.backlog:,}, 10 ms handler, hold {args.hold:.0f} s, bound {args.bound:,}"
        )
        for mode in ("async", "thread", "batch"):
            run_engine(dsn, mode, args)
        run_notifier(dsn, args)
        run_listener(dsn, args)
        run_unbounded(dsn, args)
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
