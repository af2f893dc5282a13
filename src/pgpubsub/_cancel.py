"""Asking a running durable listener to stop: its timeout passed, or its message was cancelled.

Each attempt has a :class:`Cancellation` (``pgpubsub.durable.cancellation()``
inside the listener). When it is requested, an async listener is cancelled
at once (``asyncio.CancelledError`` inside it); a sync listener cannot be
interrupted, so it is told: it checks ``requested`` (or calls
``raise_if_requested()``, or waits on ``wait()``) and stops. Either way the
attempt ends stopped once the listener returns or raises: its writes are
undone, and it fails as an :class:`~pgpubsub.errors.AttemptTimeout` (retried
or dead like any failure) or ends as cancelled
(:class:`~pgpubsub.errors.MessageCancelled`: never run again).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable

from .errors import AttemptStopped, AttemptTimeout, MessageCancelled

__all__ = ["Cancellation", "current"]

#: The running attempt's cancellation (a durable listener's thread or task).
current: contextvars.ContextVar[Cancellation] = contextvars.ContextVar("pgpubsub_cancellation")


class Cancellation:
    """Whether the attempt of message ``message_id`` should stop, and why."""

    __slots__ = ("_event", "_hooks", "_lock", "_reason", "_timeout", "_where", "message_id")

    def __init__(self, message_id: int, where: str, timeout: float | None = None):
        self.message_id = message_id
        self._where = where  # the channel, for the error's text
        self._timeout = timeout
        self._lock = threading.Lock()
        self._event: threading.Event | None = None  # made when someone waits (most never do)
        self._reason: str | None = None  # "timeout" or "cancelled"
        self._hooks: list[Callable[[], None]] = []

    @property
    def requested(self) -> bool:
        """Whether the listener should stop now."""
        return self._reason is not None

    def wait(self, seconds: float | None = None) -> bool:
        """Sleep up to ``seconds`` (in place of ``time.sleep``); True once a stop is requested."""
        with self._lock:
            if self._event is None:
                self._event = threading.Event()
                if self._reason is not None:
                    self._event.set()
            event = self._event
        return event.wait(seconds)

    def raise_if_requested(self) -> None:
        """Raise the stop's error (AttemptTimeout or MessageCancelled) if one was requested."""
        if self._reason is not None:
            raise self.error()

    def error(self) -> AttemptStopped:
        """The error the attempt ends with (only once a stop was requested)."""
        mid = self.message_id
        if self._reason == "timeout":
            return AttemptTimeout(
                f"message {mid} on {self._where}: its listener ran longer than "
                f"timeout={self._timeout:g} s"
            )
        return MessageCancelled(f"message {mid} on {self._where} was cancelled while it ran")

    def request(self, reason: str) -> None:
        """Ask the listener to stop (``reason``: "timeout" or "cancelled"; the first one counts)."""
        with self._lock:
            if self._reason is not None:
                return
            self._reason = reason
            if self._event is not None:
                self._event.set()
            hooks = list(self._hooks)
        for hook in hooks:
            hook()

    def on_request(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` when a stop is requested (at once if it was already)."""
        with self._lock:
            if self._reason is None:
                self._hooks.append(hook)
                return
        hook()
