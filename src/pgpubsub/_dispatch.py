"""Subscriptions and their workers: how received notifications reach handlers.

Each subscription owns a bounded queue and one worker. The reader appends a
whole socket read's worth of notifications to the queues and wakes each worker
once, so the per-message cost is a deque append and the handler call itself.

* async handlers run in an asyncio task, one message at a time, in order;
* sync handlers run in a thread of their own (a slow or blocking handler
  delays only its own subscription);
* batch handlers receive a list of every message queued since their last call.

A handler that raises is logged (logger ``pgpubsub._dispatch``, with channel,
handler and pid) and the worker goes on with the next message.

Bounds: :attr:`Subscription.held` counts every message the subscription holds,
queued or in its handler's hands (a batch being handled). The engine stops
reading the socket while any subscription holds ``max_pending`` messages and
resumes once each holds at most half: the server keeps the rest queued.

Pause: a paused subscription keeps its queue (still bounded) and calls no
handler until it is resumed; a handler call already running finishes.

Re-entrancy: a handler may close its own subscription (directly or through
any public API that does): the close does not wait for the handler that asked
for it, and the worker stops once the call returns.
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

__all__ = ["Handler", "Subscription", "in_dispatch_thread"]

log = logging.getLogger("pgpubsub._dispatch")

Handler = Callable[[Notify], Awaitable[Any] | Any]
BatchHandler = Callable[[list[Notify]], Awaitable[Any] | Any]

_dispatch = threading.local()


def in_dispatch_thread() -> Subscription | None:
    """The subscription whose handler the current thread is running, if any."""
    sub: Subscription | None = getattr(_dispatch, "sub", None)
    return sub


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
        backpressured: Callable[[], bool] = lambda: False,
        paused: bool = False,
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
        self.in_hand = 0  # messages of a batch being handled
        self.delivered = 0
        self.errors = 0
        self.open = not paused  # handlers may be called
        self._on_drained = on_drained
        self._backpressured = backpressured
        self._closing = False
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._cond: threading.Condition | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<Subscription {self.channel!r} {handler_name(self.handler)}>"

    @property
    def held(self) -> int:
        """Messages this subscription holds: queued, plus a batch in its handler's hands."""
        return len(self.queue) + self.in_hand

    @property
    def full(self) -> bool:
        return len(self.queue) + self.in_hand >= self.max_pending

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

    async def close(self, timeout: float, caller: asyncio.Task[Any] | None = None) -> None:
        """Finish the queued messages within ``timeout`` seconds, then stop.

        Called from this subscription's own handler, it returns at once, and
        the worker stops when that call returns, dropping what is still queued
        (the handler asked to be removed). ``caller``: the task asking, when
        this runs in a task of its own (default: the current task).
        """
        caller = caller or asyncio.current_task()
        self._closing = True
        task, thread = self._task, self._thread
        if task is not None and self._event is not None:
            self._event.set()
            if task is caller:
                self.open = False
                return
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except asyncio.TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if thread is not None and self._cond is not None:
            with self._cond:
                self._cond.notify()
            await asyncio.to_thread(thread.join, timeout)
            if thread.is_alive():
                log.warning("handler %s did not finish within %.1fs", self, timeout)

    @property
    def alive(self) -> bool:
        if self._thread is not None:
            return self._thread.is_alive()
        return self._task is not None and not self._task.done()

    def pause(self) -> None:
        """Call no handler until :meth:`resume` (queued messages are kept)."""
        self.open = False

    def resume(self) -> None:
        self.open = True
        self.wake()

    # -- the reader's side -----------------------------------------------------

    def wake(self) -> None:
        if self._event is not None:
            self._event.set()
        elif self._cond is not None:
            with self._cond:
                self._cond.notify()

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
            while queue and self.open:
                if self.batch:
                    items = list(queue)
                    queue.clear()
                    self.in_hand = len(items)
                    try:
                        result = handler(items)
                        if inspect.isawaitable(result):
                            await result
                    except Exception as exc:
                        self._failed(exc, items)
                    self.in_hand = 0
                    self.delivered += len(items)
                    continue
                # One loop per kind: no per-message type checks on the hot path.
                count = 0
                if is_async:
                    while queue and self.open:
                        msg = queue.popleft()
                        count += 1
                        try:
                            await handler(msg)
                        except Exception as exc:
                            self._failed(exc, [msg])
                else:
                    while queue and self.open:
                        msg = queue.popleft()
                        count += 1
                        try:
                            handler(msg)
                        except Exception as exc:
                            self._failed(exc, [msg])
                self.delivered += count
            if self._backpressured():
                self._on_drained()
            if self._closing and (not queue or not self.open):
                return

    def _run_thread(self) -> None:
        assert self._cond is not None and self._loop is not None
        queue, handler, cond, loop = self.queue, self.handler, self._cond, self._loop
        _dispatch.sub = self
        while True:
            with cond:
                while not (queue and self.open) and not self._closing:
                    cond.wait()
            if self._closing and (not queue or not self.open):
                return
            if self.batch:
                # The reader appends concurrently: take what is there now, one atomic pop each.
                items = [queue.popleft() for _ in range(len(queue))]
                self.in_hand = len(items)
                try:
                    handler(items)
                except Exception as exc:
                    self._failed(exc, items)
                self.in_hand = 0
                self.delivered += len(items)
            else:
                count = 0
                while queue and self.open:
                    msg = queue.popleft()
                    count += 1
                    try:
                        handler(msg)
                    except Exception as exc:
                        self._failed(exc, [msg])
                self.delivered += count
            if self._backpressured() and not loop.is_closed():
                loop.call_soon_threadsafe(self._on_drained)
