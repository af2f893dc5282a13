"""Trigger-channel benchmark (P8): a 10k-row bulk insert through a post_insert listener.

    python -m pip install -e '.[bench]'
    python benchmarks/triggers.py [--rows 10000]

Uses ``$PGPUBSUB_DSN`` or starts an embedded server. One worker in this
process listens to a trigger channel on ``bench_rows``; one INSERT ... SELECT
writes the rows; rate = rows / (commit to the last listener call). Plain: each
row event travels in its NOTIFY. Locked (``lock_notifications``): each event is
stored by the trigger and claimed by the worker, exactly once. Also shown: the
bulk insert's own time with and without the trigger (the write's overhead).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg

import pgpubsub
from pgpubsub import durable
from pgpubsub._loopthread import LoopThread
from pgpubsub.channel import TriggerChannel
from pgpubsub.embedded import EmbeddedServer
from pgpubsub.listen import Registry
from pgpubsub.triggers import install_triggers, remove_triggers
from pgpubsub.worker import Worker

INSERT = "INSERT INTO bench_rows (n, note) SELECT i, 'row ' || i FROM generate_series(1, %s) i"


@dataclass
class PlainRows(TriggerChannel, table="public.bench_rows"):
    pass


@dataclass
class LockedRows(TriggerChannel, table="public.bench_rows", lock_notifications=True):
    pass


def run(dsn: str, channel: type[Any], rows: int) -> tuple[float, float]:
    registry = Registry()
    seen = 0
    done = threading.Event()

    def on_insert(new: dict[str, Any]) -> None:
        nonlocal seen
        seen += 1
        if seen == rows:
            done.set()

    pgpubsub.post_insert_listener(channel, registry=registry)(on_insert)
    with psycopg.connect(dsn) as conn:
        conn.execute("TRUNCATE bench_rows")
        remove_triggers(conn, [PlainRows, LockedRows])
        install_triggers(conn, registry=registry)

    loop = LoopThread("bench-worker")
    worker = Worker(dsn, registry=registry)
    loop.run(worker.start(), timeout=10)
    try:
        with psycopg.connect(dsn) as conn:
            t0 = time.perf_counter()
            conn.execute(INSERT, (rows,))
            conn.commit()
            write = time.perf_counter() - t0
        assert done.wait(120), f"only {seen} of {rows} row events arrived"
        total = time.perf_counter() - t0
    finally:
        loop.run(worker.stop(), timeout=30)
        loop.close()
    return write, total


def bare_insert(dsn: str, rows: int) -> float:
    with psycopg.connect(dsn) as conn:
        conn.execute("TRUNCATE bench_rows")
        remove_triggers(conn, [PlainRows, LockedRows])
        conn.commit()
        t0 = time.perf_counter()
        conn.execute(INSERT, (rows,))
        conn.commit()
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    dsn = os.environ.get("PGPUBSUB_DSN")
    server = None if dsn else EmbeddedServer().start()
    dsn = dsn or server.conninfo  # type: ignore[union-attr]
    rows = args.rows
    try:
        durable.migrate(dsn)
        with psycopg.connect(dsn) as conn:
            conn.execute("DROP TABLE IF EXISTS bench_rows")
            conn.execute("CREATE TABLE bench_rows (id serial PRIMARY KEY, n int, note text)")
            print(f"server: PostgreSQL {conn.info.server_version}, {os.cpu_count()} cores")
        print(f"\n== P8: {rows:,}-row bulk insert, post_insert listener")
        bare = bare_insert(dsn, rows)
        print(f"{'insert without trigger':<34} write {bare * 1e3:7.1f} ms")
        for label, channel in (("plain", PlainRows), ("locked (exactly once)", LockedRows)):
            write, total = run(dsn, channel, rows)
            print(
                f"{label:<34} write {write * 1e3:7.1f} ms   processed {rows / total:>9,.0f} rows/s"
            )
    finally:
        if server:
            server.close()


if __name__ == "__main__":
    main()
