"""``pgpubsub demo``: one command that shows pgpubsub working, live.

With no database configured it starts an embedded PostgreSQL (removed at the
end). A worker listens on a typed channel while a publisher sends messages in
batches; the terminal shows counts, rate, latency and a progress bar.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import psycopg

from .channel import Channel
from .listen import Registry
from .notify import notify_many
from .worker import Worker

__all__ = ["run_demo"]


@dataclass
class Tick(Channel, name="pgpubsub_demo_ticks"):
    n: int
    sent_at: datetime.datetime
    note: str | None = None


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return "#" * filled + "." * (width - filled)


def _publish(dsn: str, total: int, batch: int = 500) -> None:
    with psycopg.connect(dsn) as conn:
        for lo in range(0, total, batch):
            now = datetime.datetime.now(datetime.timezone.utc)
            notify_many(
                Tick,
                [{"n": i, "sent_at": now} for i in range(lo, min(total, lo + batch))],
                conn=conn,
            )
            conn.commit()
            time.sleep(0.002)  # a steady stream rather than one burst


async def _run(dsn: str, total: int) -> int:
    registry = Registry()
    received: list[float] = []
    done = asyncio.Event()

    async def on_tick(n: int, sent_at: datetime.datetime) -> None:
        received.append((datetime.datetime.now(datetime.timezone.utc) - sent_at).total_seconds())
        if len(received) == total:
            done.set()

    registry.add(Tick, on_tick)
    worker = Worker(dsn, registry=registry)
    await worker.start()
    print(f"worker listening on channel {Tick.__name__!r} (wire name 'pgpubsub_demo_ticks')")
    print(f"publishing {total:,} typed messages in transactions of 500 ...")
    started = time.perf_counter()
    publisher = threading.Thread(target=_publish, args=(dsn, total), daemon=True)
    publisher.start()
    while not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), 0.1)
        except asyncio.TimeoutError:
            pass
        elapsed = time.perf_counter() - started
        got = len(received)
        lat = statistics.median(received[-1000:]) * 1000 if received else 0.0
        sys.stdout.write(
            f"\r[{_bar(got, total)}] {got:>9,}/{total:,} received"
            f"  {got / elapsed:>9,.0f} msg/s  latency p50 {lat:6.2f} ms"
        )
        sys.stdout.flush()
        if elapsed > 120:
            break
    publisher.join()
    elapsed = time.perf_counter() - started
    status = worker.engine.status()
    await worker.stop()
    print()
    ok = len(received) == total
    print(
        f"{'done' if ok else 'INCOMPLETE'}: {len(received):,} of {total:,} delivered in "
        f"{elapsed:.2f}s; handler errors {status.handler_errors}; reconnects {status.reconnects}"
    )
    return 0 if ok else 1


def run_demo(dsn: str = "", messages: int = 50_000) -> int:
    dsn = dsn or os.environ.get("PGPUBSUB_DSN", "")
    server = None
    if not dsn:
        from .embedded import EmbeddedServer

        print("no PGPUBSUB_DSN: starting an embedded PostgreSQL ...")
        server = EmbeddedServer().start()
        dsn = server.conninfo
    try:
        with psycopg.connect(dsn) as conn:
            print(f"connected to PostgreSQL {conn.info.parameter_status('server_version')}")
        return asyncio.run(_run(dsn, messages))
    finally:
        if server is not None:
            server.close()
            print("embedded PostgreSQL stopped and removed")
