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
  its work, and :data:`RELEASE` seconds more to give back what it could not
  finish; stragglers are killed; the supervisor exits 0. That holds from the
  moment ``pgpubsub listen`` has begun (a SIGTERM while it imports the
  listener modules or starts its children too): no child is started after it.
* Children are tied to the parent (``PR_SET_PDEATHSIG`` on Linux, and a poll
  of the parent's pid): if the supervisor is killed outright, they stop and do
  not linger as orphans, also when it died before they could tie themselves
  to it (:data:`PARENT_ENV` says whom to check for).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from .backoff import Backoff

__all__ = ["Supervisor", "supervised"]

log = logging.getLogger("pgpubsub._supervisor")

#: Set in the environment of the children: the supervisor checked the
#: configuration and serves the metrics.
CHILD_ENV = "PGPUBSUB_SUPERVISED"
#: Set in the environment of the children: the supervisor's pid. A child whose
#: parent is another process (its supervisor died while it started) stops.
PARENT_ENV = "PGPUBSUB_SUPERVISOR_PID"
#: Seconds a child gets after ``grace`` before it is killed: a child whose
#: listeners outlast the grace gives back the messages in hand that no
#: listener runs (one database round trip or two) before it exits.
RELEASE = 5.0


def supervised() -> bool:
    """Whether this process is a worker started by a supervisor."""
    return os.environ.get(CHILD_ENV) == "1"


def supervisor_pid() -> int | None:
    """The pid of the supervisor that started this worker (None: not supervised, or unknown)."""
    value = os.environ.get(PARENT_ENV, "")
    return int(value) if supervised() and value.isdigit() else None


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
        env = {**os.environ, CHILD_ENV: "1", PARENT_ENV: str(os.getpid())}
        slot.proc = subprocess.Popen(self.argv, env=env)
        slot.started = time.monotonic()
        log.info("started worker %d (pid %d)", slot.index, slot.proc.pid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def run(self, signalled: Callable[[], bool] = lambda: False) -> int:
        """Start the children and watch them until SIGTERM/SIGINT; the exit status.

        ``signalled``: whether a SIGTERM came before this (while the command
        started); then no child is started and the status is 0.
        """
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            # Read once our handlers are in place: a signal before went to the caller's.
            self._stopping = self._stopping or signalled()
            log.info("supervisor starting %d worker process(es)", len(self.slots))
            for slot in self.slots:
                if self._stopping:
                    break  # (a signal between two starts) start no more
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
        # Past its grace a child gives back what it could not finish: not killed meanwhile.
        deadline = time.monotonic() + self.grace + RELEASE
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "worker pid %d did not stop within %.0fs; killing it",
                    proc.pid,
                    self.grace + RELEASE,
                )
                proc.kill()
                proc.wait()
