"""The durable channel and listener the durable benchmark's worker processes import."""

from __future__ import annotations

from dataclasses import dataclass

import pgpubsub
from pgpubsub.channel import Channel
from pgpubsub.durable import connection


@dataclass
class BenchJob(Channel, name="bench_job", lock_notifications=True):
    n: int


@pgpubsub.listener(BenchJob)
def do_job(n: int) -> None:
    # The effect: one row, written in the claim transaction.
    connection().execute("INSERT INTO bench_effects (n) VALUES (%s)", (n,))


@dataclass
class BenchOrdered(Channel, name="bench_ordered", lock_notifications=True):
    key: int
    n: int


@pgpubsub.listener(BenchOrdered)
def do_ordered(key: int, n: int) -> None:
    connection().execute("INSERT INTO bench_effects (n) VALUES (%s)", (key * 1_000_000 + n,))


@dataclass
class BenchPaced(Channel, name="bench_paced", lock_notifications=True, rate_limit="1000/s"):
    n: int


@pgpubsub.listener(BenchPaced)
def do_paced(n: int) -> None:
    # When it started, by the server's clock (the rate is checked on these).
    connection().execute(
        "INSERT INTO bench_starts (n, at) VALUES (%s, pg_catalog.clock_timestamp())", (n,)
    )


@dataclass
class BenchKeyPaced(
    Channel, name="bench_key_paced", lock_notifications=True, key_rate_limit="100/s"
):
    n: int
    key: str


@pgpubsub.listener(BenchKeyPaced)
def do_key_paced(n: int, key: str) -> None:
    connection().execute(
        "INSERT INTO bench_starts (n, at, key) VALUES (%s, pg_catalog.clock_timestamp(), %s)",
        (n, key),
    )
