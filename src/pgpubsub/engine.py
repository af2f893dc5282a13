"""The listening engine: one supervised connection that every higher level uses.

An :class:`Engine` owns a dedicated autocommit connection (tagged with
``application_name``) and:

* LISTENs to the channels of its subscriptions; ``subscribe`` and ``listen``
  return after the LISTEN has taken effect when connected (a channel added
  while running is subscribed at once);
* reads with psycopg's low-level API: one ``consume_input()`` per socket
  wake-up, everything that arrived routed in one pass (see
  :mod:`pgpubsub.dispatch` for the handler side);
* supervises the connection: a loss (error, killed backend, heartbeat timeout
  on a half-open connection) is followed by reconnects with capped exponential
  backoff and jitter; channels are LISTENed again before the engine reports
  itself healthy, and then every gap handler receives a :class:`Gap`, because
  notifications sent while disconnected are gone (durable channels catch up
  by themselves; plain-channel users resynchronise in their gap handler);
* stops within a bounded time, finishing queued messages when it can.

Delivery follows PostgreSQL: a notification is received only after its
transaction commits, each listener receives each notification once, and one
sender's notifications arrive in commit order. Methods must be called on the
event loop the engine was started in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq

from . import driver
from .backoff import Backoff
from .dispatch import Subscription, handler_name
from .driver import Notify
from .errors import ConnectionLost, ListenerStateError
from .names import listen_sql, unlisten_sql, validate_channel

__all__ = ["Engine", "Gap", "GapHandler", "Status"]

log = logging.getLogger("pgpubsub.engine")

DEFAULT_BACKOFF = Backoff()


@dataclass(frozen=True)
class Gap:
    """The connection was lost and is back: notifications sent in between are missed."""

    lost_at: float  # time.time() when the loss was noticed
    restored_at: float  # time.time() when listening again
    attempts: int  # connection attempts it took
    error: str  # what the loss looked like


GapHandler = Callable[[Gap], Awaitable[Any] | Any]


@dataclass(frozen=True)
class Status:
    """A snapshot of an engine, for health checks and dashboards."""

    state: str  # "stopped" | "connecting" | "listening" | "reconnecting"
    channels: frozenset[str]
    backend_pid: int | None
    reconnects: int
    last_error: str | None
    pending: int  # messages queued for handlers
    delivered: int  # messages handed to handlers
    handler_errors: int
    paused: bool  # reading stopped (backpressure or by request)

    @property
    def healthy(self) -> bool:
        return self.state == "listening"


class _Route:
    __slots__ = ("channel", "subs")

    def __init__(self, channel: str, subs: list[Subscription]):
        self.channel = channel
        self.subs = subs


class Engine:
    """A supervised listening connection with handler dispatch (see module docs)."""

    def __init__(
        self,
        conninfo: str = "",
        *,
        backoff: Backoff = DEFAULT_BACKOFF,
        heartbeat: float = 10.0,
        command_timeout: float = 10.0,
        max_pending: int = 10_000,
        **conn_kwargs: Any,
    ):
        self.conninfo = driver.build_conninfo(conninfo, **conn_kwargs)
        self.backoff = backoff
        self.heartbeat = heartbeat
        self.command_timeout = command_timeout
        self.max_pending = max_pending
        self._subs: list[Subscription] = []
        self._listened: set[str] = set()  # channels LISTENed without a handler
        self._routes: dict[bytes, _Route] = {}
        self._gap_handlers: list[GapHandler] = []
        self._conn: driver.AsyncConnection | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "stopped"
        self._want_read = True
        self._backpressured = False
        self._in_command = 0
        self._command_lock = asyncio.Lock()
        self._lost: asyncio.Future[str] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_read = 0.0
        self._reconnects = 0
        self._last_error: str | None = None

    # -- public API ------------------------------------------------------------

    @property
    def channels(self) -> frozenset[str]:
        """Every channel this engine LISTENs to (or will, once connected)."""
        subs = {s.channel for s in self._subs if s.channel is not None}
        return frozenset(subs | self._listened)

    @property
    def running(self) -> bool:
        return self._state != "stopped"

    def status(self) -> Status:
        return Status(
            state=self._state,
            channels=self.channels,
            backend_pid=self._conn.info.backend_pid
            if self._state == "listening" and self._conn
            else None,
            reconnects=self._reconnects,
            last_error=self._last_error,
            pending=sum(len(s.queue) for s in self._subs),
            delivered=sum(s.delivered for s in self._subs),
            handler_errors=sum(s.errors for s in self._subs),
            paused=self._fd is not None and not self._reading_wanted(),
        )

    async def start(self) -> None:
        """Connect and LISTEN; raise ConnectionLost if the first connection fails.

        After a successful start, losses are handled by reconnecting.
        """
        if self.running:
            raise ListenerStateError("engine already started")
        self._loop = asyncio.get_running_loop()
        self._state = "connecting"
        try:
            await self._connect()
        except BaseException:
            self._state = "stopped"
            raise
        for sub in self._subs:
            sub.start(self._loop)
        self._tasks = [
            self._loop.create_task(self._supervise(), name="pgpubsub:supervisor"),
            self._loop.create_task(self._heartbeat(), name="pgpubsub:heartbeat"),
        ]

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop reading, finish queued messages within ``timeout``, close the connection."""
        if not self.running:
            return
        self._state = "stopped"
        self._set_reader(False)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await asyncio.gather(*(s.close(timeout) for s in self._subs))
        await self._close_conn()

    async def subscribe(
        self,
        channel: str | None,
        handler: Callable[[Any], Any],
        *,
        batch: bool = False,
        thread: bool | None = None,
    ) -> Subscription:
        """Call ``handler`` for each notification on ``channel`` (``None``: on every channel).

        ``handler`` receives a :class:`~pgpubsub.driver.Notify` (with
        ``batch=True``, a list of them per wake-up). Async handlers run in a
        task, sync handlers in a thread of their own unless ``thread=False``.
        """
        if channel is not None:
            validate_channel(channel)
        sub = Subscription(
            channel,
            handler,
            batch=batch,
            thread=thread,
            max_pending=self.max_pending,
            on_drained=self._on_drained,
            paused=lambda: self._backpressured,
        )
        new_channel = channel is not None and channel not in self.channels
        self._subs.append(sub)
        if self.running:
            assert self._loop is not None
            sub.start(self._loop)
        self._rebuild_routes()
        if new_channel and channel is not None:
            await self._listen_now([channel])
        return sub

    async def unsubscribe(self, sub: Subscription, timeout: float = 5.0) -> None:
        """Remove a subscription (its queued messages are finished first)."""
        if sub not in self._subs:
            return
        self._subs.remove(sub)
        self._rebuild_routes()
        if self.running:
            await sub.close(timeout)
        if sub.channel is not None and sub.channel not in self.channels:
            await self._unlisten_now([sub.channel])

    async def listen(self, *channels: str) -> None:
        """LISTEN to channels without a handler (for ``channel=None`` subscriptions)."""
        new = [validate_channel(c) for c in channels if c not in self.channels]
        self._listened.update(channels)
        self._rebuild_routes()
        await self._listen_now(new)

    async def unlisten(self, *channels: str) -> None:
        self._listened.difference_update(channels)
        gone = [c for c in channels if c not in self.channels]
        self._rebuild_routes()
        await self._unlisten_now(gone)

    def add_gap_handler(self, handler: GapHandler) -> None:
        """Call ``handler(gap)`` after each reconnect (sync or async; errors are logged)."""
        self._gap_handlers.append(handler)

    def pause(self) -> None:
        """Stop reading notifications (the server keeps them queued) until resume()."""
        self._want_read = False
        self._update_reader()

    def resume(self) -> None:
        self._want_read = True
        self._update_reader()

    # -- connection ------------------------------------------------------------

    async def _connect(self) -> None:
        conn = await driver.connect_async(self.conninfo)
        try:
            conn.add_notify_handler(self._on_driver_notify)
            channels = sorted(self.channels)
            if channels:
                await conn.execute(listen_sql(channels))
        except psycopg.OperationalError as exc:
            await conn.close()
            raise ConnectionLost(f"connection lost while listening: {exc}") from exc
        self._conn = conn
        self._lost = asyncio.get_running_loop().create_future()
        self._state = "listening"
        self._last_read = time.monotonic()
        self._update_reader()
        log.info("listening on %d channel(s), backend pid %s", len(channels), conn.info.backend_pid)

    async def _close_conn(self) -> None:
        self._set_reader(False)
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), self.command_timeout)
            except Exception:  # closing a broken connection can fail; it is gone either way
                log.debug("error closing connection", exc_info=True)

    def _connection_lost(self, why: str) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(why)
        self._set_reader(False)

    async def _supervise(self) -> None:
        while True:
            assert self._lost is not None
            why = await self._lost
            lost_at = time.time()
            self._last_error = why
            self._state = "reconnecting"
            log.warning("connection lost (%s); reconnecting", why)
            await self._close_conn()
            attempt = 0
            while True:
                await asyncio.sleep(self.backoff.delay(attempt))
                attempt += 1
                try:
                    await self._connect()
                    break
                except ConnectionLost as exc:
                    self._last_error = str(exc)
                    log.warning("reconnect attempt %d failed: %s", attempt, exc)
            self._reconnects += 1
            self._fire_gap(Gap(lost_at, time.time(), attempt, why))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat / 2)
            idle = time.monotonic() - self._last_read
            if self._state == "listening" and idle >= self.heartbeat:
                try:
                    await self._command(psycopg.sql.SQL("SELECT 1"))
                except ConnectionLost:
                    pass  # _command reported the loss

    def _fire_gap(self, gap: Gap) -> None:
        for handler in self._gap_handlers:
            try:
                result = handler(gap)
                if asyncio.iscoroutine(result):
                    asyncio.ensure_future(self._guard(handler, result))
            except Exception:
                log.exception("gap handler %s failed", handler_name(handler))

    @staticmethod
    async def _guard(handler: GapHandler, coro: Awaitable[Any]) -> None:
        try:
            await coro
        except Exception:
            log.exception("gap handler %s failed", handler_name(handler))

    async def _command(self, query: psycopg.sql.SQL | psycopg.sql.Composed) -> None:
        """Run one statement on the listening connection, stepping the reader aside."""
        async with self._command_lock:
            conn = self._conn
            if conn is None or self._state != "listening":
                return  # LISTEN happens on (re)connect
            self._in_command += 1
            self._update_reader()
            try:
                await asyncio.wait_for(conn.execute(query), self.command_timeout)
                self._last_read = time.monotonic()
            except (psycopg.OperationalError, asyncio.TimeoutError) as exc:
                self._connection_lost(f"{type(exc).__name__}: {exc}")
                raise ConnectionLost(f"connection lost: {exc}") from exc
            finally:
                self._in_command -= 1
                self._update_reader()

    async def _listen_now(self, channels: list[str]) -> None:
        if channels:
            await self._command(listen_sql(channels))

    async def _unlisten_now(self, channels: list[str]) -> None:
        if channels:
            await self._command(unlisten_sql(channels))

    # -- reading ---------------------------------------------------------------

    def _reading_wanted(self) -> bool:
        return (
            self._want_read
            and not self._backpressured
            and not self._in_command
            and self._conn is not None
            and self._state == "listening"
        )

    def _update_reader(self) -> None:
        self._set_reader(self._reading_wanted())
        if self._fd is not None:
            self._on_readable()  # data may have arrived while the reader was off

    def _set_reader(self, on: bool) -> None:
        loop = self._loop
        if loop is None:
            return
        if on and self._fd is None and self._conn is not None:
            self._fd = self._conn.pgconn.socket
            loop.add_reader(self._fd, self._on_readable)
        elif not on and self._fd is not None:
            loop.remove_reader(self._fd)
            self._fd = None

    def _rebuild_routes(self) -> None:
        taps = [s for s in self._subs if s.channel is None]
        routes: dict[bytes, _Route] = {}
        for channel in self.channels:
            subs = [s for s in self._subs if s.channel == channel] + taps
            routes[channel.encode()] = _Route(channel, subs)
        self._routes = routes

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        pgconn = conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as exc:
            self._connection_lost(str(exc))
            return
        if pgconn.status != pq.ConnStatus.OK:
            self._connection_lost("the server closed the connection")
            return
        self._last_read = time.monotonic()
        notifies = pgconn.notifies
        n = notifies()
        if n is None:
            return
        routes = self._routes
        woken: list[Subscription] = []
        new = tuple.__new__  # Notify(...) without the NamedTuple's Python-level __new__
        while n is not None:
            route = routes.get(n.relname)
            if route is not None:
                msg = new(Notify, (route.channel, n.extra.decode(), n.be_pid))
                for sub in route.subs:
                    queue = sub.queue
                    if not queue:
                        woken.append(sub)
                    queue.append(msg)
            n = notifies()
        self._after_routing(woken)

    def _on_driver_notify(self, n: psycopg.Notify) -> None:
        # Notifications psycopg received while running one of our commands.
        route = self._routes.get(n.channel.encode())
        if route is None:
            return
        msg = Notify(route.channel, n.payload, n.pid)
        woken = [s for s in route.subs if not s.queue]
        for sub in route.subs:
            sub.queue.append(msg)
        self._after_routing(woken)

    def _after_routing(self, woken: list[Subscription]) -> None:
        for sub in woken:
            sub.wake()
        for sub in self._subs:
            if sub.full:
                self._backpressured = True
                self._set_reader(False)
                log.debug("backpressure: %r has %d queued", sub, len(sub.queue))
                break

    def _on_drained(self) -> None:
        if self._backpressured and not any(len(s.queue) > s.max_pending // 2 for s in self._subs):
            self._backpressured = False
            self._update_reader()
