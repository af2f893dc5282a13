"""Listeners for the flow-control tests: each run is written to ``started`` (channel, n,
pid and the server's clock) in the message's own transaction, so a row is a start that
committed: exactly one per message when nothing is lost or run twice. ``claimed`` is when
its worker claimed it (and took its token): its claim set ``run_at`` to that instant plus
the first retry delay (``retry_delay=1``, the claim's lease). ``key`` is the message's
limit_key; ``ended`` when its listener returned (key_concurrency: runs that overlap)."""

from __future__ import annotations

import os
import time

import pgpubsub
from app.flow_channels import Crowded, Paced, Pausable, PerKey, Slow
from pgpubsub.durable import cancellation, connection


def _started(channel: str, n: int, lease: float = 1.0) -> None:
    connection().execute(
        "INSERT INTO started (channel, n, pid, at, claimed, key) "
        "SELECT %s, %s, %s, pg_catalog.clock_timestamp(), "
        "m.run_at - pg_catalog.make_interval(secs => %s), m.limit_key "
        "FROM pgpubsub.message m WHERE m.id = %s",
        (channel, n, os.getpid(), lease, cancellation().message_id),
    )


@pgpubsub.listener(Pausable)
def pausable(n: int) -> None:
    _started("pausable", n)


@pgpubsub.listener(Paced)
def paced(n: int) -> None:
    _started("paced", n)


@pgpubsub.listener(Slow)
def slow(n: int) -> None:
    _started("slow", n)


@pgpubsub.listener(PerKey)
def per_key(n: int) -> None:
    _started("per_key", n)


@pgpubsub.listener(Crowded)
def crowded(n: int, sleep: float) -> None:
    _started("crowded", n, lease=5.0)
    time.sleep(sleep)
    connection().execute(
        "UPDATE started SET ended = pg_catalog.clock_timestamp() WHERE channel = 'crowded' "
        "AND n = %s AND pid = %s AND ended IS NULL",
        (n, os.getpid()),
    )
