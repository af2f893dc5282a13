"""Listeners for the flow-control tests: each run is written to ``started`` (channel, n,
pid and the server's clock) in the message's own transaction, so a row is a start that
committed: exactly one per message when nothing is lost or run twice. ``claimed`` is when
its worker claimed it (and took its token): its claim set ``run_at`` to that instant plus
the first retry delay (``retry_delay=1``, the claim's lease)."""

from __future__ import annotations

import os

import pgpubsub
from app.flow_channels import Paced, Pausable, Slow
from pgpubsub.durable import cancellation, connection


def _started(channel: str, n: int) -> None:
    connection().execute(
        "INSERT INTO started (channel, n, pid, at, claimed) "
        "SELECT %s, %s, %s, pg_catalog.clock_timestamp(), m.run_at - interval '1 second' "
        "FROM pgpubsub.message m WHERE m.id = %s",
        (channel, n, os.getpid(), cancellation().message_id),
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
