"""Batched publish benchmark (P5): pgpubsub.notify_many beside raw psycopg 3.

    python benchmarks/publish.py [--n 200000] [--batch 1000]

Both send typed-channel JSON payloads with one statement per batch, one commit
per batch; a listener is LISTENing so the server really queues them.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import msgspec
import psycopg

import pgpubsub
from pgpubsub.channel import Channel, spec_of
from pgpubsub.embedded import EmbeddedServer


@dataclass
class Tick(Channel, name="bench_publish"):
    n: int
    note: str


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    dsn = os.environ.get("PGPUBSUB_DSN")
    server = None if dsn else EmbeddedServer().start()
    dsn = dsn or server.conninfo  # type: ignore[union-attr]
    try:
        listener = pgpubsub.connect(dsn)
        listener.listen(spec_of(Tick).name)
        rows = [{"n": i, "note": "x"} for i in range(args.n)]
        enc = msgspec.json.Encoder()
        with psycopg.connect(dsn) as conn:
            t0 = time.perf_counter()
            for lo in range(0, args.n, args.batch):
                payloads = [enc.encode(r).decode() for r in rows[lo : lo + args.batch]]
                conn.execute(
                    "SELECT pg_notify(%s, x) FROM unnest(%s::text[]) AS x",
                    ("bench_publish", payloads),
                )
                conn.commit()
            raw = args.n / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for lo in range(0, args.n, args.batch):
                pgpubsub.notify_many(Tick, rows[lo : lo + args.batch], conn=conn)
                conn.commit()
            ours = args.n / (time.perf_counter() - t0)
        print(f"raw psycopg 3 unnest/pg_notify   {raw:>11,.0f}/s")
        print(f"pgpubsub.notify_many (typed)     {ours:>11,.0f}/s   x{ours / raw:.2f} vs raw")
        listener.close()
    finally:
        if server:
            server.close()


if __name__ == "__main__":
    main()
