"""Subscriptions and their workers: how received notifications reach handlers.

Each subscription owns a bounded queue and one worker. The reader appends a
whole socket read's worth of notifications to the queues and wakes each worker
once, so the per-message cost is a deque append and the handler call itself.

* async handlers run in an asyncio task, one message at a time, in order;
* sync handlers run in a thread of their own (a slow or blocking handler
  delays only its own subscription);
* batch handlers receive a list of every message queued since their last call.

A handler that raises is logged (logger ``pgpubsub.dispatch``, with channel,
handler and pid) and the worker goes on with the next message. When a queue
holds ``max_pending`` messages the reader stops reading the socket (the server
keeps further notifications in its queue) until the worker has drained it below
half: memory stays bounded however slow a handler is.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from .driver import Notify
from .errors import ConfigurationError

__all__ = ["Handler", "Subscription"]

log = logging.getLogger("pgpubsub.dispatch")

Handler = Callable[[Notify], Awaitable[Any] | Any]
BatchHandler = Callable[[list[Notify]], Awaitable[Any] | Any]


def handler_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class Subscription:
    """One handler on one channel (``channel=None``: every channel listened to)."""

    def __init__(
        self,
        channel: str | None,
        handler: Callable[[Any], Any],
        *,
        batch: bool = False,
        thread: bool | None = None,
        max_pending: int = 10_000,
        on_drained: Callable[[], None] = lambda: None,
        paused: Callable[[], bool] = lambda: False,
    ):
        self.channel = channel
        self.handler = handler
        self.batch = batch
        self.is_async = is_async = inspect.iscoroutinefunction(
            handler
        ) or inspect.iscoroutinefunction(getattr(handler, "__call__", None))  # noqa: B004
        if is_async and thread:
            raise ConfigurationError(
                f"async handler {handler_name(handler)} cannot run in a thread"
            )
        self.threaded = (not is_async) if thread is None else thread
        self.max_pending = max_pending
        self.queue: deque[Notify] = deque()
        self.delivered = 0
        self.errors = 0
        self._on_drained = on_drained
        self._paused = paused
        self._closing = False
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._cond: threading.Condition | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<Subscription {self.channel!r} {handler_name(self.handler)}>"

    # -- lifecycle (called on the engine's loop) -------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the worker (again, after a close: subscriptions outlive a stop)."""
        self._loop = loop
        self._closing = False
        if self.threaded:
            self._cond = threading.Condition()
            self._thread = threading.Thread(
                target=self._run_thread, name=f"pgpubsub:{self.channel}", daemon=True
            )
            self._thread.start()
        else:
            self._event = asyncio.Event()
            self._task = loop.create_task(self._run_task(), name=f"pgpubsub:{self.channel}")

    async def close(self, timeout: float) -> None:
        """Finish the queued messages within ``timeout`` seconds, then stop."""
        self._closing = True
        if self._task is not None and self._event is not None:
            self._event.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self._thread is not None and self._cond is not None:
            with self._cond:
                self._cond.notify()
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                log.warning("handler %s did not finish within %.1fs", self, timeout)

    @property
    def alive(self) -> bool:
        if self._thread is not None:
            return self._thread.is_alive()
        return self._task is not None and not self._task.done()

    # -- the reader's side -----------------------------------------------------

    def wake(self) -> None:
        if self._event is not None:
            self._event.set()
        elif self._cond is not None:
            with self._cond:
                self._cond.notify()

    @property
    def full(self) -> bool:
        return len(self.queue) >= self.max_pending

    # -- workers ---------------------------------------------------------------

    def _failed(self, exc: BaseException, messages: list[Notify]) -> None:
        self.errors += 1
        first = messages[0] if messages else None
        log.error(
            "handler %s failed on channel %r (pid %s): %r",
            handler_name(self.handler),
            first.channel if first else self.channel,
            first.pid if first else None,
            exc,
            exc_info=exc,
            extra={
                "channel": first.channel if first else self.channel,
                "handler": handler_name(self.handler),
                "pid": first.pid if first else None,
            },
        )

    async def _run_task(self) -> None:
        assert self._event is not None
        queue, handler, event = self.queue, self.handler, self._event
        is_async = self.is_async
        while True:
            await event.wait()
            event.clear()
            while queue:
                if self.batch:
                    items = list(queue)
                    queue.clear()
                    try:
                        result = handler(items)
                        if inspect.isawaitable(result):
                            await result
                    except Exception as exc:
                        self._failed(exc, items)
                    self.delivered += len(items)
                    continue
                # One loop per kind: no per-message type checks on the hot path.
                count = 0
                if is_async:
                    while queue:
                        msg = queue.popleft()
                        count += 1
                        try:
                            await handler(msg)
                        except Exception as exc:
                            self._failed(exc, [msg])
                else:
                    while queue:
                        msg = queue.popleft()
                        count += 1
                        try:
                            handler(msg)
                        except Exception as exc:
                            self._failed(exc, [msg])
                self.delivered += count
            if self._paused():
                self._on_drained()
            if self._closing:
                return

    def _run_thread(self) -> None:
        assert self._cond is not None and self._loop is not None
        queue, handler, cond, loop = self.queue, self.handler, self._cond, self._loop
        while True:
            with cond:
                while not queue and not self._closing:
                    cond.wait()
            if not queue and self._closing:
                return
            # The reader appends concurrently: take what is there now, one atomic pop each.
            items = [queue.popleft() for _ in range(len(queue))]
            if self.batch:
                try:
                    handler(items)
                except Exception as exc:
                    self._failed(exc, items)
            else:
                for msg in items:
                    try:
                        handler(msg)
                    except Exception as exc:
                        self._failed(exc, [msg])
            self.delivered += len(items)
            if self._paused() and not loop.is_closed():
                loop.call_soon_threadsafe(self._on_drained)
