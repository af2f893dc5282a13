"""``Listener`` and ``ConnectionPool``: the psqlpy-style asyncio API on the engine.

Code written for psqlpy's ``Listener`` runs with its import line changed to
``from pgpubsub import ConnectionPool, Connection, Listener``::

    listener = db_pool.listener()
    await listener.add_callback(channel="test_channel", callback=callback)
    await listener.startup()
    listener.listen()          # returns at once; callbacks run in the background
    ...
    listener.abort_listen()
    await listener.shutdown()

Callbacks receive ``(connection, payload, channel, process_id)``; the
connection is a second, autocommit connection of the listener on which
callbacks may run queries (the listening connection itself is never busy with
user queries). It is replaced after a reconnect or when it breaks, so it
works again once the server is back.

Between ``startup()`` (or ``abort_listen()``) and ``listen()`` nothing is
lost: notifications wait, up to ``max_pending`` per callback in memory and
the rest in the server, and are delivered on ``listen()``.

Unlike psqlpy: names are case-exact and safely quoted; each callback runs in
its own worker, so one that raises is logged and one that is slow delays only
itself; a dropped connection is reconnected (gap callbacks are told);
``is_started`` and ``is_listening`` tell the truth; and a callback may call
any method of its listener (clear its own channel, abort, shut down).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

from . import driver
from ._dispatch import Subscription, handler_name
from .driver import AsyncConnection, Notify
from .engine import Engine, GapHandler, Status
from .errors import ListenerStartError

__all__ = ["Connection", "ConnectionPool", "Listener", "ListenerNotificationMsg"]

#: The connection type callbacks receive (a psycopg AsyncConnection).
Connection = AsyncConnection

Callback = Callable[[AsyncConnection, str, str, int], Awaitable[Any] | Any]


class ListenerNotificationMsg(NamedTuple):
    """One notification, as ``async for msg in listener`` yields it."""

    process_id: int
    channel: str
    payload: str
    connection: AsyncConnection


class Listener:
    """An asyncio listener with callbacks per channel (see the module docstring).

    ``dsn`` and keywords are psycopg connection arguments; ``heartbeat``,
    ``max_pending`` and ``backoff`` tune the engine (:class:`~pgpubsub.engine.Engine`).
    """

    def __init__(self, dsn: str = "", **kwargs: Any):
        options = {k: kwargs.pop(k) for k in ("heartbeat", "max_pending", "backoff") if k in kwargs}
        self._conninfo = driver.build_conninfo(dsn, **kwargs)
        self._engine = Engine(self._conninfo, **options)
        self._callbacks: dict[str, list[tuple[Callback, Subscription]]] = {}
        self._connection: AsyncConnection | None = None
        self._listening = False
        self._connection_reconnects = 0  # the engine's reconnects when it was made

    # -- attributes ------------------------------------------------------------

    @property
    def connection(self) -> AsyncConnection:
        """The connection callbacks receive; raises ListenerStartError before startup()."""
        if self._connection is None:
            raise ListenerStartError("Listener.startup() has not been called")
        return self._connection

    @property
    def is_started(self) -> bool:
        """True from startup() to shutdown() (also while reconnecting: see status())."""
        return self._connection is not None and self._engine.running

    @property
    def is_listening(self) -> bool:
        """True while callbacks run: listen() called, not aborted, and connected."""
        return self.is_started and self._listening and self._engine.status().healthy

    def status(self) -> Status:
        return self._engine.status()

    def add_gap_callback(self, callback: GapHandler) -> None:
        """Call ``callback(gap)`` after each reconnect: notifications in the gap were missed."""
        self._engine.add_gap_handler(callback)

    # -- callbacks -------------------------------------------------------------

    async def add_callback(self, channel: str, callback: Callback) -> None:
        """Add a callback to ``channel`` (before or after listen(); LISTEN is immediate)."""

        async def deliver(msg: Notify) -> None:
            connection = await self._working_connection()
            result = callback(connection, msg.payload, msg.channel, msg.pid)
            if asyncio.iscoroutine(result):
                await result

        deliver.__qualname__ = handler_name(callback)
        sub = await self._engine.subscribe(channel, deliver, paused=not self._listening)
        self._callbacks.setdefault(channel, []).append((callback, sub))

    async def clear_channel_callbacks(self, channel: str) -> None:
        """Remove every callback of ``channel`` (and stop listening to it)."""
        for _, sub in self._callbacks.pop(channel, []):
            await self._engine.unsubscribe(sub)

    async def clear_all_channels(self) -> None:
        """Remove every channel and callback."""
        for channel in list(self._callbacks):
            await self.clear_channel_callbacks(channel)

    # -- lifecycle -------------------------------------------------------------

    async def startup(self) -> None:
        """Connect; callable once, or again after shutdown()."""
        if self._connection is not None:
            raise ListenerStartError("Listener already started; call shutdown() first")
        self._connection = await driver.connect_async(self._conninfo)
        self._connection_reconnects = self._engine.reconnects
        try:
            await self._engine.start()
        except BaseException:
            await self._connection.close()
            self._connection = None
            raise

    async def shutdown(self) -> None:
        """Abort listening (if active) and release both connections."""
        self.abort_listen()
        await self._engine.stop()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    def listen(self) -> None:
        """Start running callbacks in the background; returns at once."""
        if not self.is_started:
            raise ListenerStartError("Listener.startup() has not been called")
        self._listening = True
        if subs := self._subscriptions():
            self._engine.resume(*subs)

    def abort_listen(self) -> None:
        """Stop running callbacks; notifications are kept until listen() again."""
        self._listening = False
        if subs := self._subscriptions():
            self._engine.pause(*subs)

    def _subscriptions(self) -> list[Subscription]:
        return [sub for pairs in self._callbacks.values() for _, sub in pairs]

    # -- the callbacks' connection -----------------------------------------------

    async def _working_connection(self) -> AsyncConnection:
        """The callbacks' connection; a new one if it broke or the engine reconnected since.

        After a reconnect the server may have restarted, and a connection
        that was idle does not know it yet.
        """
        conn = self.connection
        if conn.closed or conn.broken or self._connection_reconnects != self._engine.reconnects:
            reconnects = self._engine.reconnects
            self._connection = await driver.connect_async(self._conninfo)
            self._connection_reconnects = reconnects
            await conn.close()
            conn = self._connection
        return conn

    # -- iteration -------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[ListenerNotificationMsg]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ListenerNotificationMsg]:
        """Every notification on the listener's channels, while the loop runs."""
        if not self.is_started:
            raise ListenerStartError("Listener.startup() has not been called")
        queue: asyncio.Queue[Notify] = asyncio.Queue(maxsize=self._engine.max_pending)
        tap = await self._engine.subscribe(None, queue.put, paused=False)
        try:
            while True:
                msg = await queue.get()
                connection = await self._working_connection()
                yield ListenerNotificationMsg(msg.pid, msg.channel, msg.payload, connection)
        finally:
            await self._engine.unsubscribe(tap, timeout=0)


class ConnectionPool:
    """The entry point psqlpy code starts from: ``ConnectionPool(dsn=...).listener()``.

    It hands out listeners; it does not pool query connections (use
    ``psycopg_pool`` for that).
    """

    def __init__(self, dsn: str = "", **kwargs: Any):
        self.dsn = dsn
        self.kwargs = kwargs

    def listener(self) -> Listener:
        return Listener(self.dsn, **self.kwargs)

    def close(self) -> None:
        """Nothing to release: listeners own their connections."""
