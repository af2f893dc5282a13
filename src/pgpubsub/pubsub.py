"""The connection level: one connection, LISTEN/NOTIFY, and a stream of events.

This is the API of the original ``pgpubsub`` 0.0.5 (``pgpubsub.connect()``,
``notify``, ``listen``, ``unlisten``, ``events``, ``get_event``), made safe:

* channel names are quoted identifiers, taken exactly as written (``Foo`` and
  ``foo`` are two channels); a name PostgreSQL cannot hold raises
  :class:`~pgpubsub.errors.InvalidChannelName` before any SQL runs;
* payloads are sent as bound parameters of ``pg_catalog.pg_notify`` and are
  checked in UTF-8 bytes first (over 7999 bytes raises PayloadTooLarge);
* a notification already received (for example the echo of this connection's
  own ``notify``) is returned at once, without waiting on the socket;
* a dropped connection raises :class:`~pgpubsub.errors.ConnectionLost`.

The connection is in autocommit mode, so ``notify`` is delivered when it
returns. Inside ``with pubsub.conn.transaction():`` it is delivered at commit,
and not at all on rollback. Events are :class:`~pgpubsub.driver.Notify` tuples with
``channel``, ``payload`` and ``pid``; ``pubsub.conn`` is a psycopg connection
that also answers psycopg2's ``get_backend_pid()``.

A PubSub is not safe to share between threads (use one per thread); an
AsyncPubSub belongs to the event loop that created it. For supervised
listening with reconnects and handlers, see :mod:`pgpubsub.engine`.
"""

from __future__ import annotations

import asyncio
import select
from collections import deque
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from . import driver
from .driver import Notify
from .errors import ConnectionLost
from .names import NOTIFY_SQL, check_payload, listen_sql, unlisten_sql, validate_channel

__all__ = ["AsyncPubSub", "Notify", "PubSub", "connect", "connect_async"]

Query = str | sql.SQL | sql.Composed
Params = tuple[Any, ...] | None


def connect(conninfo: str = "", /, **kwargs: Any) -> PubSub:
    """Open a connection and return a :class:`PubSub` on it.

    Accepts what ``psycopg2.connect`` accepts: a conninfo string or URI, given
    positionally or as ``dsn=``, and/or keywords (``user``, ``dbname`` or
    ``database``, ``host``, ``port``, ``password``, ...).
    """
    return PubSub(driver.connect(driver.build_conninfo(conninfo, **kwargs)))


async def connect_async(conninfo: str = "", /, **kwargs: Any) -> AsyncPubSub:
    """Open a connection and return an :class:`AsyncPubSub` on it."""
    conn = await driver.connect_async(driver.build_conninfo(conninfo, **kwargs))
    return AsyncPubSub(conn)


class _Base:
    """What the sync and async PubSub share: the event buffer and the channel set."""

    def __init__(self) -> None:
        self._events: deque[Notify] = deque()
        self.channels: set[str] = set()

    def _on_notify(self, n: psycopg.Notify) -> None:
        self._events.append(Notify.of(n))

    def _read(self, pgconn: psycopg.pq.abc.PGconn) -> None:
        driver.read_ready(pgconn)
        driver.drain(pgconn, self._events.append)

    def get_event(self) -> Notify | None:
        """Return the next event received, or None at once if there is none."""
        if not self._events:
            self._poll()
        return self._events.popleft() if self._events else None

    def _poll(self) -> None:
        raise NotImplementedError


class PubSub(_Base):
    """LISTEN/NOTIFY on one sync connection (see the module docstring)."""

    def __init__(self, conn: driver.Connection):
        super().__init__()
        self.conn = conn
        conn.add_notify_handler(self._on_notify)

    def _execute(self, query: Query, params: Params = None) -> None:
        try:
            self.conn.execute(query, params)
        except psycopg.OperationalError as exc:
            raise ConnectionLost(f"connection lost: {exc}") from exc

    def notify(self, channel: str, payload: str = "") -> None:
        """Send ``payload`` on ``channel`` (delivered when the transaction commits)."""
        validate_channel(channel)
        self._execute(NOTIFY_SQL, (channel, check_payload(payload, channel)))

    def listen(self, channel: str) -> None:
        """Subscribe to ``channel``; events sent after this returns are received."""
        self._execute(listen_sql([channel]))
        self.channels.add(channel)

    def unlisten(self, channel: str) -> None:
        """Stop receiving events from ``channel``."""
        self._execute(unlisten_sql([channel]))
        self.channels.discard(channel)

    def _poll(self) -> None:
        pgconn = self.conn.pgconn
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            raise ConnectionLost("connection lost: the connection is closed")
        if select.select([pgconn.socket], [], [], 0)[0]:
            self._read(pgconn)

    def events(
        self, select_timeout: float = 5, yield_timeouts: bool = False
    ) -> Iterator[Notify | None]:
        """Yield events as they arrive, forever.

        Waits up to ``select_timeout`` seconds at a time; with
        ``yield_timeouts=True`` a ``None`` is yielded after each wait that
        brought nothing (useful for keepalives). Raises ConnectionLost if the
        connection drops.
        """
        events = self._events
        while True:
            while events:
                yield events.popleft()
            pgconn = self.conn.pgconn
            if pgconn.status != psycopg.pq.ConnStatus.OK:
                raise ConnectionLost("connection lost: the connection is closed")
            if select.select([pgconn.socket], [], [], select_timeout)[0]:
                self._read(pgconn)
            elif yield_timeouts:
                yield None

    def close(self) -> None:
        """Close the connection (listening ends with it)."""
        self.conn.close()

    def __enter__(self) -> PubSub:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncPubSub(_Base):
    """LISTEN/NOTIFY on one asyncio connection: ``async for event in pubsub.events()``."""

    def __init__(self, conn: driver.AsyncConnection):
        super().__init__()
        self.conn = conn
        conn.add_notify_handler(self._on_notify)
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._wakeup: asyncio.Future[None] | None = None
        self._error: ConnectionLost | None = None
        self._fd: int | None = None
        self._start_reading()

    def _start_reading(self) -> None:
        if self._fd is None and not self.conn.closed:
            self._fd = self.conn.pgconn.socket
            self._loop.add_reader(self._fd, self._on_readable)

    def _stop_reading(self) -> None:
        # The fd is remembered: a lost connection no longer reports its socket.
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None

    def _on_readable(self) -> None:
        try:
            self._read(self.conn.pgconn)
        except ConnectionLost as exc:
            self._error = exc
            self._stop_reading()
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _poll(self) -> None:
        if self._error is not None:
            raise self._error

    async def _execute(self, query: Query, params: Params = None) -> None:
        # psycopg waits on the same socket while it runs a command: step aside.
        async with self._lock:
            self._stop_reading()
            try:
                await self.conn.execute(query, params)
            except psycopg.OperationalError as exc:
                self._error = ConnectionLost(f"connection lost: {exc}")
                raise self._error from exc
            finally:
                if self._error is None:
                    self._start_reading()
                self._wake()

    async def notify(self, channel: str, payload: str = "") -> None:
        """Send ``payload`` on ``channel`` (delivered when the transaction commits)."""
        validate_channel(channel)
        await self._execute(NOTIFY_SQL, (channel, check_payload(payload, channel)))

    async def listen(self, channel: str) -> None:
        """Subscribe to ``channel``; events sent after this returns are received."""
        await self._execute(listen_sql([channel]))
        self.channels.add(channel)

    async def unlisten(self, channel: str) -> None:
        """Stop receiving events from ``channel``."""
        await self._execute(unlisten_sql([channel]))
        self.channels.discard(channel)

    async def events(
        self, select_timeout: float = 5, yield_timeouts: bool = False
    ) -> AsyncIterator[Notify | None]:
        """Yield events as they arrive, forever (see :meth:`PubSub.events`)."""
        events = self._events
        while True:
            while events:
                yield events.popleft()
            if self._error is not None:
                raise self._error
            self._wakeup = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._wakeup), select_timeout)
            except asyncio.TimeoutError:
                if yield_timeouts:
                    yield None
            finally:
                self._wakeup = None

    def __aiter__(self) -> AsyncIterator[Notify | None]:
        return self.events()

    async def close(self) -> None:
        """Close the connection (listening ends with it)."""
        self._stop_reading()
        await self.conn.close()

    async def __aenter__(self) -> AsyncPubSub:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
