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
        import time

        time.sleep(float(os.environ.get("CRASH_AFTER", "0")))  # others of the process run
        how = os.environ.get("CRASH_HOW", "kill")
        if how == "exit":
            os._exit(3)  # no clean-up, no rollback: as an OOM kill or a segfault would
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Neighbour(Channel, lock_notifications=True, max_attempts=3, retention=600):
    """Another channel of the same worker process: slow, innocent."""

    n: int


@pgpubsub.listener(Neighbour)
def neighbour(n: int) -> None:
    import time

    time.sleep(0.1)
    connection().execute(
        "INSERT INTO effects (kind, n, pid) VALUES ('neighbour', %s, %s)", (n, os.getpid())
    )


@dataclass
class Suspects(
    Channel, lock_notifications=True, concurrency=2, max_attempts=2, retry_delay=0.05, retention=600
):
    """Two processors: two crash suspects are claimed alone at once, one waits at the gate."""

    n: int


@pgpubsub.listener(Suspects)
def suspect(n: int) -> None:
    connection().execute(
        "INSERT INTO effects (kind, n, pid) VALUES ('suspect', %s, %s)", (n, os.getpid())
    )
    if str(n) == os.environ.get("CRASH_ON"):
        import time

        time.sleep(float(os.environ.get("CRASH_AFTER", "0")))
        os.kill(os.getpid(), signal.SIGKILL)
