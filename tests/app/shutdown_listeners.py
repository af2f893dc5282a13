"""Listeners for the shutdown tests (tests/test_shutdown.py): a durable channel whose
message ``n=0`` hangs in its listener, and hooks that hold a process at import.

* ``HOLD_IMPORT``: a path; the process (the supervisor when ``HOLD_IN`` is
  ``supervisor``, its workers when it is ``worker``) writes ``<path>.<pid>``
  and waits at import until ``<path>.go`` exists: a process still starting.
* Every run of a listener of :class:`app.shutdown_channels.Hangs` is written
  to ``started`` first. Message ``n=0`` then sleeps far longer than any
  ``--grace``; ``n=1`` fails its first two runs (of three attempts); the
  others, and ``n=1`` then, write their effect in the claim transaction.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg

import pgpubsub
from app.shutdown_channels import Hangs
from pgpubsub._supervisor import supervised
from pgpubsub.durable import connection


def _hold() -> None:
    hold, where = os.environ.get("HOLD_IMPORT"), os.environ.get("HOLD_IN")
    if not hold or where != ("worker" if supervised() else "supervisor"):
        return
    Path(f"{hold}.{os.getpid()}").touch()
    while not Path(f"{hold}.go").exists():
        time.sleep(0.01)


_hold()


@pgpubsub.listener(Hangs)
def hangs(n: int) -> None:
    with psycopg.connect(os.environ["PGPUBSUB_DSN"], autocommit=True) as conn:
        conn.execute("INSERT INTO started (n, pid) VALUES (%s, %s)", (n, os.getpid()))
        runs = conn.execute("SELECT count(*) FROM started WHERE n = %s", (n,)).fetchone()
    if n == 0:
        time.sleep(3600)  # past any --grace: the worker stops with this listener running
    if n == 1 and runs is not None and runs[0] <= 2:
        raise RuntimeError(f"message 1 fails its first two runs (run {runs[0]})")
    connection().execute("INSERT INTO effects (n, pid) VALUES (%s, %s)", (n, os.getpid()))
