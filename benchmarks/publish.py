"""Batched publish benchmark (P5): pgpubsub.notify_many beside raw psycopg 3.

    python benchmarks/publish.py [--n 200000] [--batch 1000]

All send typed-channel JSON payloads with one statement per batch, one commit
per batch; a listener is LISTENing so the server really queues them. The raw
rows show what the array's wire format costs: in text format every JSON payload
is quoted and escaped inside the array literal.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import psycopg

import pgpubsub
from pgpubsub import notify_many
from pgpubsub.channel import Channel, spec_of
from pgpubsub.embedded import EmbeddedServer


@dataclass
class Tick(Channel, name="bench_publish"):
    n: int
    note: str


def rate(n: int, batch: int, send: Callable[[int, int], object], conn: psycopg.Connection) -> float:
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        send(lo, min(n, lo + batch))
        conn.commit()
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    dsn = os.environ.get("PGPUBSUB_DSN")
    server = None if dsn else EmbeddedServer().start()
    dsn = dsn or server.conninfo  # type: ignore[union-attr]
    n, batch = args.n, args.batch
    try:
        listener = pgpubsub.connect(dsn)
        listener.listen(spec_of(Tick).name)
        rows = [{"n": i, "note": "x"} for i in range(n)]
        ticks = [Tick(n=i, note="x") for i in range(n)]
        enc = msgspec.json.Encoder()
        with psycopg.connect(dsn) as conn:

            def raw(query: str) -> Callable[[int, int], object]:
                def send(lo: int, hi: int) -> object:
                    payloads = [enc.encode(r).decode() for r in rows[lo:hi]]
                    return conn.execute(query, ("bench_publish", payloads))

                return send

            def lines(lo: int, hi: int) -> object:
                blob = enc.encode_lines(rows[lo:hi])[:-1].decode()
                return conn.execute(
                    "SELECT count(pg_notify(%s, x)) FROM unnest(string_to_array(%s, E'\\n')) x",
                    ("bench_publish", blob),
                )

            results = [
                (
                    "raw psycopg 3, text[] in text format",
                    rate(n, batch, raw("SELECT pg_notify(%s, x) FROM unnest(%s::text[]) x"), conn),
                ),
                (
                    "raw psycopg 3, text[] in binary format",
                    rate(n, batch, raw("SELECT pg_notify(%s, x) FROM unnest(%b::text[]) x"), conn),
                ),
                (
                    "raw psycopg 3, JSON lines split by server",
                    rate(n, batch, lines, conn),
                ),
                (
                    "pgpubsub.notify_many, dicts of fields",
                    rate(n, batch, lambda lo, hi: notify_many(Tick, rows[lo:hi], conn=conn), conn),
                ),
                (
                    "pgpubsub.notify_many, channel instances",
                    rate(n, batch, lambda lo, hi: notify_many(Tick, ticks[lo:hi], conn=conn), conn),
                ),
            ]
        best_raw = max(r for _, r in results[:3])
        print(f"== batched publish, {n:,} typed messages in transactions of {batch:,}")
        for label, r in results:
            print(f"{label:<44} {r:>11,.0f}/s   x{r / best_raw:.2f} vs best raw")
        listener.close()
    finally:
        if server:
            server.close()


if __name__ == "__main__":
    main()
