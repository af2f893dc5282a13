"""Holds a Python process at interpreter start, before any pgpubsub code runs.

With ``HOLD_START`` set (a path) and this folder on ``PYTHONPATH``, a process
started as a supervisor's worker (``PGPUBSUB_SUPERVISED=1``) writes
``<path>.<pid>`` and waits until ``<path>.go`` exists: a worker whose
supervisor may die before it could tie itself to it (tests/test_shutdown.py).
"""

from __future__ import annotations

import os
import time

_hold = os.environ.get("HOLD_START")
if _hold and os.environ.get("PGPUBSUB_SUPERVISED") == "1":
    open(f"{_hold}.{os.getpid()}", "w").close()  # noqa: SIM115 - closed at once
    while not os.path.exists(f"{_hold}.go"):
        time.sleep(0.01)
