"""Durable listeners with results, and a batch's members and callback (tests/test_results.py)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pgpubsub
from pgpubsub.channel import Channel
from pgpubsub.durable import connection


@dataclass
class Square(Channel, lock_notifications=True, results=True, max_attempts=2, retry_delay=0.05):
    n: int


@pgpubsub.listener(Square)
def square(n: int) -> dict[str, int]:
    connection().execute(
        "INSERT INTO effects (kind, n, pid) VALUES ('square', %s, %s)", (n, os.getpid())
    )
    return {"n": n, "square": n * n, "pid": os.getpid()}


@dataclass
class Member(Channel, lock_notifications=True, max_in_flight=1, max_attempts=3, retry_delay=0.05):
    """One message per transaction (max_in_flight=1), in id order: the last one runs last."""

    n: int


@pgpubsub.listener(Member)
def member(n: int) -> None:
    connection().execute(
        "INSERT INTO effects (kind, n, pid) VALUES ('member', %s, %s)", (n, os.getpid())
    )
    marker = os.environ.get("CRASH_MARKER")
    if marker and str(n) == os.environ.get("CRASH_ON") and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)  # in the last member's transaction, before COMMIT


@dataclass
class AllDone(Channel, lock_notifications=True, retention=600):
    label: str
    batch: pgpubsub.BatchOutcome | None = None


@pgpubsub.listener(AllDone)
def all_done(label: str, batch: pgpubsub.BatchOutcome | None) -> None:
    assert batch is not None
    connection().execute(
        "INSERT INTO effects (kind, n, pid) VALUES ('callback', %s, %s)", (batch.done, os.getpid())
    )
