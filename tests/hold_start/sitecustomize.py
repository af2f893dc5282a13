"""Holds a Python process while it starts, for tests/test_shutdown.py (this folder on
``PYTHONPATH``). Each hold writes ``<path>.<pid>`` and waits until ``<path>.go`` exists.

* ``HOLD_START=<path>``: a supervisor's worker (``PGPUBSUB_SUPERVISED=1``) at
  interpreter start, before any pgpubsub code runs: a worker whose supervisor
  may die before it could tie itself to it.
* ``HOLD_MODULE=<module>`` and ``HOLD_MODULE_AT=<path>``: a process that is no
  supervisor's worker, just before it imports ``<module>``: the command
  stopped while ``import pgpubsub`` is under way.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def _hold(path: str) -> None:
    open(f"{path}.{os.getpid()}", "w").close()  # noqa: SIM115 - closed at once
    while not os.path.exists(f"{path}.go"):
        time.sleep(0.01)


class _HoldBefore:
    """A meta path finder that finds nothing: it only waits before ``module`` is imported."""

    def __init__(self, module: str, path: str):
        self.module, self.path = module, path

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == self.module:
            sys.meta_path.remove(self)
            _hold(self.path)


if os.environ.get("HOLD_START") and os.environ.get("PGPUBSUB_SUPERVISED") == "1":
    _hold(os.environ["HOLD_START"])
if os.environ.get("HOLD_MODULE") and os.environ.get("PGPUBSUB_SUPERVISED") != "1":
    sys.meta_path.insert(0, _HoldBefore(os.environ["HOLD_MODULE"], os.environ["HOLD_MODULE_AT"]))
