"""``pgpubsub demo``: one command that shows pgpubsub working, live.

With no database configured it starts an embedded PostgreSQL (removed at the
end; as root it runs as the ``postgres`` user when there is one, and never
changes the machine). Act 1: a worker listens on a typed channel while a
publisher sends messages in batches; a live line shows counts, rate and
latency. Act 2: two workers share a durable channel whose listener writes a
row in the claim transaction; one order always fails. Every other order's row
is written exactly once, and the failing one ends dead after its retries. The
demo's table is removed at the end; on your own server (``--dsn``) the dead
message is kept for you to inspect with ``pgpubsub messages``.

The live line fits the terminal's width and log records print above it; when
stdout is not a terminal, progress comes as plain lines every few seconds.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass

import psycopg

from . import durable
from ._screen import Screen
from .channel import Channel, spec_of
from .listen import Registry
from .notify import notify_many
from .worker import Worker

__all__ = ["run_demo"]

#: Orders of act 2 (at most).
ORDERS = 5_000


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


def _bar(done: int, total: int, width: int) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _line(screen: Screen, done: int, total: int, text: str) -> str:
    """``[####....] text``, the bar as wide as the terminal leaves room for (10 to 30)."""
    room = screen.width() - 1 - len(text) - 3
    width = max(10, min(30, room))
    return f"{_bar(done, total, width)} {text}"


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


async def _act1(screen: Screen, dsn: str, total: int) -> bool:
    registry = Registry()
    received: list[float] = []
    done = asyncio.Event()
    last_at = [0.0]

    async def on_tick(n: int, sent_at: datetime.datetime) -> None:
        received.append((datetime.datetime.now(datetime.timezone.utc) - sent_at).total_seconds())
        last_at[0] = time.perf_counter()
        if len(received) == total:
            done.set()

    registry.add(Tick, on_tick)
    worker = Worker(dsn, registry=registry, register=False)
    await worker.start()
    screen.print(f"Act 1: a worker listens on the typed channel {spec_of(Tick).name!r};")
    screen.print(f"a publisher sends {total:,} messages in transactions of 500.")
    started = time.perf_counter()
    publisher = threading.Thread(target=_publish, args=(dsn, total), daemon=True)
    publisher.start()
    if total == 0:
        done.set()
    while not done.is_set() and time.perf_counter() - started < 120:
        try:
            await asyncio.wait_for(done.wait(), 0.1)
        except asyncio.TimeoutError:
            pass
        got = len(received)
        active = max(1e-9, (last_at[0] or time.perf_counter()) - started)
        lat = statistics.median(received[-1000:]) * 1000 if received else 0.0
        screen.status(
            _line(screen, got, total, f"{got:,}/{total:,} {got / active:,.0f}/s p50 {lat:.1f} ms")
        )
    publisher.join()
    status = worker.engine.status()
    await worker.stop()
    got = len(received)
    active = max(1e-9, (last_at[0] or time.perf_counter()) - started)
    lat = statistics.median(received) * 1000 if received else 0.0
    ok = got == total
    screen.end(
        f"{'delivered' if ok else 'INCOMPLETE:'} {got:,} of {total:,} in {active:.2f}s "
        f"({got / active:,.0f} msg/s, latency p50 {lat:.1f} ms)"
    )
    if status.handler_errors or status.reconnects:
        screen.print(f"handler errors {status.handler_errors}, reconnects {status.reconnects}")
    return ok


def _scalar(conn: psycopg.Connection[tuple[int]], query: str, *params: object) -> int:
    row = conn.execute(query, params).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


SHIPPED = "SELECT pg_catalog.count(*) FROM pgpubsub_demo_shipments"
DEAD = "SELECT pg_catalog.count(*) FROM pgpubsub.message WHERE channel = %s AND status = 'dead'"
DISTINCT = "SELECT pg_catalog.count(DISTINCT {}) FROM pgpubsub_demo_shipments"
POISON_ID = (
    "SELECT id FROM pgpubsub.message WHERE channel = %s "
    "AND (payload::jsonb ->> 'order_id')::int = %s"
)


async def _act2(screen: Screen, dsn: str, orders: int, keep_dead: bool) -> bool:
    durable.migrate(dsn)
    name = spec_of(Order).name
    poison = min(13, orders)  # order numbers start at 1
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pgpubsub_demo_shipments")
        conn.execute("CREATE TABLE pgpubsub_demo_shipments (order_id int, worker bigint)")
        conn.execute("DELETE FROM pgpubsub.message WHERE channel = %s", (name,))
    registry = Registry()

    def ship(order_id: int) -> None:
        if order_id == poison:
            raise ValueError(f"order {order_id} has no address")
        durable.connection().execute(
            "INSERT INTO pgpubsub_demo_shipments VALUES (%s, %s)",
            (order_id, threading.get_ident()),
        )

    registry.add(Order, ship)
    with psycopg.connect(dsn) as conn:
        notify_many(Order, [{"order_id": i} for i in range(1, orders + 1)], conn=conn)
        conn.commit()
        poison_id = _scalar(conn, POISON_ID, name, poison) if orders else 0
    screen.print()
    screen.print(f"Act 2: {orders:,} orders on the durable channel {name!r}, two workers.")
    screen.print("The listener writes a row in the claim transaction.")
    if orders:
        screen.print(f"Order {poison} (message {poison_id}) has no address: it always fails.")
    workers = [Worker(dsn, registry=registry, register=False) for _ in range(2)]
    for w in workers:
        await w.start()
    started = time.perf_counter()
    last_at, shipped, dead = started, 0, 0
    want = orders - 1 if orders else 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.perf_counter() - started < 60 and (shipped < want or dead < min(1, orders)):
            await asyncio.sleep(0.1)
            now_shipped = _scalar(conn, SHIPPED)
            if now_shipped != shipped:
                last_at, shipped = time.perf_counter(), now_shipped
            dead = _scalar(conn, DEAD, name)
            rate = shipped / max(1e-9, last_at - started)
            screen.status(
                _line(
                    screen, shipped + dead, orders, f"{shipped:,} shipped {rate:,.0f}/s dead {dead}"
                )
            )
    for w in workers:
        await w.stop()
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = _scalar(conn, SHIPPED)
        once = _scalar(
            conn, "SELECT pg_catalog.count(DISTINCT order_id) FROM pgpubsub_demo_shipments"
        )
        by = _scalar(conn, "SELECT pg_catalog.count(DISTINCT worker) FROM pgpubsub_demo_shipments")
        dead = _scalar(conn, DEAD, name)
        conn.execute("DROP TABLE pgpubsub_demo_shipments")
        if not keep_dead:
            conn.execute("DELETE FROM pgpubsub.message WHERE channel = %s", (name,))
    rate = rows / max(1e-9, last_at - started)
    screen.end(f"shipped {rows:,} of {orders:,} orders in {last_at - started:.2f}s ({rate:,.0f}/s)")
    screen.print(
        f"rows written: {rows:,} for {once:,} orders (each exactly once, by {by} worker"
        f"{'s' if by != 1 else ''}); dead: {dead}"
        + (f" (order {poison}, after {Order.max_attempts} attempts)" if dead else "")
    )
    if dead and keep_dead:
        screen.print(
            f"The dead message is kept: `pgpubsub messages show {poison_id}` shows its error,"
            f" `pgpubsub messages replay {poison_id}` runs it again (same --dsn)."
        )
    return rows == once == want and dead == min(1, orders)


def run_demo(dsn: str = "", count: int = 50_000) -> int:
    """Both acts; 0 when each did what it says, 1 when not, 130 when interrupted."""
    dsn = dsn or os.environ.get("PGPUBSUB_DSN", "")
    screen = Screen()
    logging.getLogger().handlers = [screen.handler()]
    server = None
    try:
        if not dsn:
            from .embedded import EmbeddedServer

            screen.print("No --dsn or PGPUBSUB_DSN: starting an embedded PostgreSQL ...")
            server = EmbeddedServer(prepare=False).start()
            dsn = server.conninfo
        with psycopg.connect(dsn) as conn:
            version = conn.info.parameter_status("server_version")
        screen.print(f"Connected to PostgreSQL {version}.")
        screen.print()
        ok = asyncio.run(_act1(screen, dsn, count))
        ok = asyncio.run(_act2(screen, dsn, min(count, ORDERS), keep_dead=server is None)) and ok
        if server is not None:
            screen.print(
                "Run `pgpubsub demo --dsn ...` on a server of yours to keep the dead message"
                " and inspect it with `pgpubsub messages`."
            )
        return 0 if ok else 1
    except KeyboardInterrupt:
        screen.end("interrupted")
        if server is None and dsn:  # leave the user's database as it was
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute("DROP TABLE IF EXISTS pgpubsub_demo_shipments")
        return 130
    finally:
        if server is not None:
            server.close()
            screen.print("The embedded PostgreSQL is stopped and removed.")
