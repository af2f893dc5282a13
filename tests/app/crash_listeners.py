"""A durable listener that kills its own process on one message (failure isolation tests)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import pgpubsub
from pgpubsub.channel import Channel
from pgpubsub.durable import connection


@dataclass
class Crashy(Channel, lock_notifications=True, max_attempts=3, retry_delay=0.05, retention=600):
    """Kept after completion (retention), so that the tests can read each message's attempts."""

    n: int


@pgpubsub.listener(Crashy)
def handle(n: int) -> None:
    connection().execute(
        "INSERT INTO effects (kind, n, pid) VALUES ('job', %s, %s)", (n, os.getpid())
    )
    if str(n) == os.environ.get("CRASH_ON"):
        how = os.environ.get("CRASH_HOW", "kill")
        if how == "exit":
            os._exit(3)  # no clean-up, no rollback: as an OOM kill or a segfault would
        os.kill(os.getpid(), signal.SIGKILL)
