"""The process supervisor behind ``pgpubsub listen --processes N``.

One parent, N worker children, never deeper: the parent starts each child as
a fresh ``python -m pgpubsub`` process (so children get the same log options
and import the user's modules themselves) and watches them.

* A child that exits is restarted, after a backoff delay that grows while it
  keeps failing.
* A child that dies within ``fast_exit`` seconds of its start ``max_fast_exits``
  times in a row (for example because a module fails to import) is not
  restarted: the supervisor stops the others and exits with status 1.
* SIGTERM or SIGINT: every child gets SIGTERM and ``grace`` seconds to finish
  or release its work; stragglers are killed; the supervisor exits 0.
* Children are tied to the parent (``PR_SET_PDEATHSIG`` on Linux): if the
  supervisor is killed outright, they get SIGTERM and do not linger as orphans.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from types import FrameType

from .backoff import Backoff

__all__ = ["Supervisor", "supervised"]

log = logging.getLogger("pgpubsub._supervisor")

#: Set in the environment of the children: the supervisor checked the
#: configuration and serves the metrics.
CHILD_ENV = "PGPUBSUB_SUPERVISED"


def supervised() -> bool:
    """Whether this process is a worker started by a supervisor."""
    return os.environ.get(CHILD_ENV) == "1"


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    fast_exits: int = 0
    restart_at: float = 0.0
    restarts: int = field(default=0)


class Supervisor:
    def __init__(
        self,
        argv: list[str],
        processes: int,
        *,
        backoff: Backoff = Backoff(base=0.5, factor=2, cap=30),  # noqa: B008
        fast_exit: float = 10.0,
        max_fast_exits: int = 5,
        grace: float = 30.0,
    ):
        self.argv = argv
        self.slots = [_Slot(i) for i in range(processes)]
        self.backoff = backoff
        self.fast_exit = fast_exit
        self.max_fast_exits = max_fast_exits
        self.grace = grace
        self._stopping = False

    def _spawn(self, slot: _Slot) -> None:
        slot.proc = subprocess.Popen(self.argv, env={**os.environ, CHILD_ENV: "1"})
        slot.started = time.monotonic()
        log.info("started worker %d (pid %d)", slot.index, slot.proc.pid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("supervisor starting %d worker process(es)", len(self.slots))
            for slot in self.slots:
                self._spawn(slot)
            status = self._watch()
            self._shutdown()
            log.info("supervisor stopped")
            return status
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _watch(self) -> int:
        while not self._stopping:
            time.sleep(0.05)
            now = time.monotonic()
            for slot in self.slots:
                if slot.proc is None:
                    if now >= slot.restart_at and not self._stopping:
                        slot.restarts += 1
                        self._spawn(slot)
                    continue
                code = slot.proc.poll()
                if code is None:
                    continue
                lived = now - slot.started
                slot.proc = None
                slot.fast_exits = slot.fast_exits + 1 if lived < self.fast_exit else 0
                if slot.fast_exits >= self.max_fast_exits:
                    log.error(
                        "worker %d exited %d times within %.0fs of starting (last status %s); "
                        "giving up",
                        slot.index,
                        slot.fast_exits,
                        self.fast_exit,
                        code,
                    )
                    return 1
                delay = self.backoff.delay(slot.fast_exits)
                log.warning(
                    "worker %d exited with status %s after %.1fs; restarting in %.1fs",
                    slot.index,
                    code,
                    lived,
                    delay,
                )
                slot.restart_at = now + delay
        return 0

    def _shutdown(self) -> None:
        live = [s.proc for s in self.slots if s.proc is not None]
        log.info("stopping %d worker process(es); they have %.0fs to finish", len(live), self.grace)
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "worker pid %d did not stop within %.0fs; killing it", proc.pid, self.grace
                )
                proc.kill()
                proc.wait()
