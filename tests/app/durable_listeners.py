"""Durable listeners for the CLI tests: effects written in the claim transaction."""

from __future__ import annotations

import os
import random
import time

import pgpubsub
from app.channels import Jobs
from pgpubsub.durable import connection


@pgpubsub.listener(Jobs)
def do_job(n: int) -> None:
    connection().execute(
        "INSERT INTO effects (kind, n, pid) VALUES ('job', %s, %s)", (n, os.getpid())
    )
    hang = os.environ.get("HANG_FILE")
    if n == 3 and hang and os.path.exists(hang):
        with open(hang + ".pid.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(hang + ".pid.tmp", hang + ".pid")  # the test never sees it half-written
        time.sleep(3600)  # the test SIGKILLs us here
    delay = float(os.environ.get("RANDOM_DELAY", "0"))
    if delay:
        time.sleep(random.uniform(0, delay))
