"""``pgpubsub demo``: one command that shows pgpubsub working, live.

With no database configured it starts an embedded PostgreSQL (removed at the
end). Act 1: a worker listens on a typed channel while a publisher sends
messages in batches; the terminal shows counts, rate, latency and a progress
bar. Act 2: two workers share a durable channel whose listener writes a row in
the claim transaction; one message always fails. Every other message's row is
written exactly once, and the failing one ends dead after its retries. The
demo's table and messages are removed at the end.
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

from . import durable, messages
from .channel import Channel, spec_of
from .listen import Registry
from .notify import notify_many
from .worker import Worker

__all__ = ["run_demo"]


@dataclass
class Tick(Channel, name="pgpubsub_demo_ticks"):
    n: int
    sent_at: datetime.datetime
    note: str | None = None


@dataclass
class Order(Channel, name="pgpubsub_demo_orders", lock_notifications=True):
    order_id: int
    max_attempts = 3
    retry_delay = 0.2


POISON = 13


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


def _count(dsn: str, query: str, *params: object) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0


async def _durable(dsn: str, total: int) -> int:
    durable.migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pgpubsub_demo_shipments")
        conn.execute("CREATE TABLE pgpubsub_demo_shipments (order_id int, worker bigint)")
    registry = Registry()

    def ship(order_id: int) -> None:
        if order_id == POISON:
            raise ValueError(f"order {order_id} has no address")
        durable.connection().execute(
            "INSERT INTO pgpubsub_demo_shipments VALUES (%s, %s)",
            (order_id, threading.get_ident()),
        )

    registry.add(Order, ship)
    print(
        f"\n{total:,} orders on a durable channel, two workers; the listener writes a row in "
        f"the claim transaction; order {POISON} always fails"
    )
    workers = [Worker(dsn, registry=registry) for _ in range(2)]
    for w in workers:
        await w.start()
    with psycopg.connect(dsn) as conn:
        notify_many(Order, [{"order_id": i} for i in range(total)], conn=conn)
    name = spec_of(Order).name
    dead_query = (
        "SELECT pg_catalog.count(*) FROM pgpubsub.message WHERE channel = %s AND status = 'dead'"
    )
    started = time.perf_counter()
    shipped = dead = 0
    while time.perf_counter() - started < 60 and (shipped < total - 1 or not dead):
        await asyncio.sleep(0.1)
        shipped = _count(dsn, "SELECT pg_catalog.count(*) FROM pgpubsub_demo_shipments")
        dead = _count(dsn, dead_query, name)
        sys.stdout.write(
            f"\r[{_bar(shipped, total - 1)}] {shipped:>7,}/{total - 1:,} shipped"
            f"  {shipped / (time.perf_counter() - started):>7,.0f}/s  dead {dead}"
        )
        sys.stdout.flush()
    for w in workers:
        await w.stop()
    print()
    once = _count(dsn, "SELECT pg_catalog.count(DISTINCT order_id) FROM pgpubsub_demo_shipments")
    by_workers = _count(
        dsn, "SELECT pg_catalog.count(DISTINCT worker) FROM pgpubsub_demo_shipments"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        dead_rows = messages.list_messages(conn, "dead", channel=name)
        last = (dead_rows[0].last_error or "").strip().splitlines()[-1] if dead_rows else ""
        print(
            f"rows written: {shipped:,} for {once:,} orders (each exactly once, by "
            f"{by_workers} workers); dead: {len(dead_rows)} after {Order.max_attempts} "
            f"attempts ({last})"
        )
        print("(`pgpubsub messages list` shows dead messages; `... replay ID` runs one again)")
        conn.execute("DROP TABLE pgpubsub_demo_shipments")
        messages.purge(conn, "dead", channel=name)
    return 0 if shipped == once == total - 1 and len(dead_rows) == 1 else 1


def run_demo(dsn: str = "", count: int = 50_000) -> int:
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
        first = asyncio.run(_run(dsn, count))
        return first or asyncio.run(_durable(dsn, min(count, 5_000)))
    finally:
        if server is not None:
            server.close()
            print("embedded PostgreSQL stopped and removed")
