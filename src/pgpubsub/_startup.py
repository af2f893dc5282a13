"""A SIGTERM while the ``pgpubsub listen`` command starts: noted, not fatal.

Importing pgpubsub takes a good part of a second (the driver, the listener
modules after it), and a process stopped meanwhile (a deployment replaced at
once, a supervisor stopped as it starts) must still exit 0, having started
nothing. This module is imported first by the package, before anything slow:
when this process *is* that command (``python -m pgpubsub listen ...`` or the
``pgpubsub listen ...`` script), it notes SIGTERM until :mod:`pgpubsub.cli`
takes the signal over (:data:`EARLY`). Any other program that imports
pgpubsub keeps its signal handlers as they are. A SIGTERM in the few
milliseconds before the interpreter reaches this module still ends the
process by the signal: nothing of pgpubsub runs yet.
"""

from __future__ import annotations

# Nothing slow here: this runs before the rest of the package loads.
import os
import signal
import sys
from types import FrameType

__all__ = ["EARLY", "TermNoted", "listen_command"]


class TermNoted:
    """Notes SIGTERM (instead of dying of it) until :meth:`close`; main thread only."""

    def __init__(self) -> None:
        self._received = False
        self._previous: signal._HANDLER = None
        self._set = False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._note)
            self._set = True
        except ValueError:  # not the main thread: signals are not ours to handle
            pass

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._received = True

    def received(self) -> bool:
        """Whether a SIGTERM came since this was made."""
        return self._received

    def close(self) -> None:
        """Give SIGTERM back to the handler it had before."""
        if self._set:
            # None: a handler set outside Python; the default is what such a process had.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._set = False


def listen_command(orig_argv: list[str], argv: list[str]) -> bool:
    """Whether the interpreter's command line (``sys.orig_argv``, ``sys.argv``) runs
    ``pgpubsub listen``: ``python [options] -m pgpubsub ... listen ...`` or the
    ``pgpubsub`` script."""
    if "-m" in orig_argv:
        at = orig_argv.index("-m")
        module = orig_argv[at + 1] if at + 1 < len(orig_argv) else ""
        return module in ("pgpubsub", "pgpubsub.__main__") and "listen" in orig_argv[at + 2 :]
    script = os.path.basename(argv[0]) if argv else ""
    return script in ("pgpubsub", "pgpubsub.exe") and "listen" in argv[1:]


#: The SIGTERM noting of a starting ``pgpubsub listen`` (None in any other program).
EARLY: TermNoted | None = (
    TermNoted() if listen_command(list(getattr(sys, "orig_argv", [])), sys.argv) else None
)
