"""One live status line under scrolling output, for the demo.

On a terminal the status line is redrawn in place (``\\r`` and erase-line),
cut to the terminal's width so it never wraps, and anything else printed
(log records included) goes above it, folded at words to the same width.
Elsewhere (a pipe, a file) the status line is printed as a plain line at most
every ``every`` seconds.
"""

from __future__ import annotations

import logging
import shutil
import sys
import textwrap
import threading
import time
from typing import TextIO

__all__ = ["Screen"]

ERASE = "\r\x1b[K"


class Screen:
    def __init__(self, stream: TextIO | None = None, every: float = 2.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = every
        self._live = ""
        self._printed_at = 0.0
        self._lock = threading.Lock()  # log records come from worker threads too

    def width(self) -> int:
        return shutil.get_terminal_size((80, 24)).columns

    def fit(self, text: str) -> str:
        room = self.width() - 1  # the last column would wrap on some terminals
        return text if len(text) <= room else text[: max(0, room - 1)] + "…"

    def status(self, text: str, force: bool = False) -> None:
        """Show ``text`` as the live line (throttled to plain lines off a terminal)."""
        with self._lock:
            self._status(text, force)

    def _status(self, text: str, force: bool) -> None:
        if self.tty:
            self._live = self.fit(text)
            self.stream.write(ERASE + self._live)
            self.stream.flush()
        elif force or time.monotonic() - self._printed_at >= self.every:
            self._printed_at = time.monotonic()
            self.stream.write(text + "\n")
            self.stream.flush()

    def print(self, text: str = "") -> None:
        """A line above the live line."""
        with self._lock:
            self._print(text)

    def _print(self, text: str) -> None:
        if self.tty:
            room = self.width() - 1
            lines = [
                wrapped
                for part in text.split("\n")
                for wrapped in textwrap.wrap(part, room, subsequent_indent="    ") or [""]
            ]
            self.stream.write(ERASE + "\n".join(lines) + "\n" + self._live)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self, text: str) -> None:
        """Replace the live line with ``text`` for good."""
        with self._lock:
            self._live = ""
            self.stream.write((ERASE + self.fit(text) if self.tty else text) + "\n")
            self.stream.flush()

    def handler(self) -> logging.Handler:
        """A logging handler that prints records above the live line."""
        screen = self

        class ScreenHandler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                screen.print(f"  {record.levelname.lower()}: {record.getMessage()}")

        return ScreenHandler()
