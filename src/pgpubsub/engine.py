"""The listening engine: one supervised connection that every higher level uses.

An :class:`Engine` owns a dedicated autocommit connection (tagged with
``application_name``) and:

* LISTENs to the channels of its subscriptions; ``subscribe`` and ``listen``
  return after the LISTEN has taken effect when connected (a channel added
  while running is subscribed at once);
* reads with psycopg's low-level API: one ``consume_input()`` per socket
  wake-up, everything that arrived routed in one pass (see
  :mod:`pgpubsub._dispatch` for the handler side);
* supervises the connection: a loss (error, killed backend, heartbeat timeout
  on a half-open connection) is followed by reconnects with capped exponential
  backoff and jitter; channels are LISTENed again before the engine reports
  itself healthy, and then every gap handler receives a :class:`Gap`, because
  notifications sent while disconnected are gone (durable channels catch up
  by themselves; plain-channel users resynchronise in their gap handler);
* waits for the server at start as it does after a loss (by default for as
  long as it takes; ``start_timeout`` bounds it), but fails at once when the
  server refuses the credentials or the database does not exist;
* stops within a bounded time, finishing queued messages when it can.

Memory is bounded in every state. No subscription holds more than
``max_pending`` messages plus what one socket read brings: past that the
engine stops reading and the server keeps the rest. Commands on the listening
connection (LISTEN, UNLISTEN, the heartbeat) are sent without blocking and
their results are read by the same bounded reader, so a command never pulls a
backlog into memory: it waits for room like everything else. While reading is
stopped the heartbeat asks the kernel instead (TCP keepalives and the socket's
state), so a half-open connection is still noticed.

:meth:`Engine.pause` stops handler calls; while every subscription is paused
the engine stops reading too, and the server keeps the notifications (a
command run meanwhile reads at most ``max_pending`` per subscription into
memory). Everything is delivered after :meth:`Engine.resume`, whatever the
pause's length. A LISTEN asked for while a paused subscription is full waits
for the resume.

Delivery follows PostgreSQL: a notification is received only after its
transaction commits, each listener receives each notification once, and one
sender's notifications arrive in commit order. Methods must be called on the
event loop the engine was started in.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq

from . import driver
from ._dispatch import Subscription, handler_name
from .backoff import Backoff, worth_logging
from .driver import Notify
from .errors import ConnectionFailed, ConnectionLost, DatabaseError, ListenerStateError
from .names import listen_sql, unlisten_sql, validate_channel

__all__ = ["Engine", "Gap", "GapHandler", "Status"]

log = logging.getLogger("pgpubsub.engine")

DEFAULT_BACKOFF = Backoff()

# tcpi_state values of a connection the peer has closed or reset.
_TCP_CLOSED_STATES = frozenset({7, 8})  # TCP_CLOSE, TCP_CLOSE_WAIT


def socket_trouble(fd: int) -> str | None:
    """What the kernel knows of a socket we are not reading: an error, or the peer gone."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        return str(exc)
    with sock:
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            return os.strerror(error)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_INFO"):
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            if state in _TCP_CLOSED_STATES:
                return "the server closed the connection"
    return None


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
    pending: int  # messages held for handlers (queued or in a handler's hands)
    delivered: int  # messages handed to handlers
    handler_errors: int
    paused: bool  # handlers paused by request, or reading stopped by backpressure

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
        start_timeout: float | None = None,
        **conn_kwargs: Any,
    ):
        self.conninfo = driver.build_conninfo(conninfo, **conn_kwargs)
        self.backoff = backoff
        self.heartbeat = heartbeat
        self.command_timeout = command_timeout
        self.max_pending = max_pending
        self.start_timeout = start_timeout
        self._subs: list[Subscription] = []
        self._listened: set[str] = set()  # channels LISTENed without a handler
        self._routes: dict[bytes, _Route] = {}
        self._gap_handlers: list[GapHandler] = []
        self._conn: driver.AsyncConnection | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "stopped"
        self._paused = False
        self._backpressured = False
        self._command_lock = asyncio.Lock()
        self._command_result: asyncio.Future[None] | None = None
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

    @property
    def reconnects(self) -> int:
        """How many times the connection was lost and made again."""
        return self._reconnects

    def status(self) -> Status:
        return Status(
            state=self._state,
            channels=self.channels,
            backend_pid=self._conn.info.backend_pid
            if self._state == "listening" and self._conn
            else None,
            reconnects=self._reconnects,
            last_error=self._last_error,
            pending=sum(s.held for s in self._subs),
            delivered=sum(s.delivered for s in self._subs),
            handler_errors=sum(s.errors for s in self._subs),
            paused=self._paused or self._backpressured,
        )

    async def start(self) -> None:
        """Connect and LISTEN, waiting for the server if it is not there yet.

        Waits with the engine's backoff for as long as it takes, or
        ``start_timeout`` seconds, then raises ConnectionFailed; raises at once
        when the server refuses the credentials or the database. After a
        successful start, losses are handled by reconnecting.
        """
        if self.running:
            raise ListenerStateError("engine already started")
        self._loop = asyncio.get_running_loop()
        self._state = "connecting"
        deadline = None if self.start_timeout is None else time.monotonic() + self.start_timeout
        try:
            await self._connect_until(deadline, starting=True)
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
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        self._tasks = []
        await asyncio.gather(*(s.close(timeout, caller=current) for s in self._subs))
        await self._close_conn()

    async def subscribe(
        self,
        channel: str | None,
        handler: Callable[[Any], Any],
        *,
        batch: bool = False,
        thread: bool | None = None,
        paused: bool | None = None,
    ) -> Subscription:
        """Call ``handler`` for each notification on ``channel`` (``None``: on every channel).

        ``handler`` receives a :class:`~pgpubsub.driver.Notify` (with
        ``batch=True``, a list of them per wake-up). Async handlers run in a
        task, sync handlers in a thread of their own unless ``thread=False``.
        ``paused`` (default: the engine's state) starts the subscription paused.
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
            backpressured=lambda: self._backpressured,
            paused=self._paused if paused is None else paused,
        )
        new_channel = channel is not None and channel not in self.channels
        self._subs.append(sub)
        if self.running:
            assert self._loop is not None
            sub.start(self._loop)
        self._rebuild_routes()
        self._update_reader()
        if new_channel and channel is not None:
            await self._listen_now([channel])
        return sub

    async def unsubscribe(self, sub: Subscription, timeout: float = 5.0) -> None:
        """Remove a subscription (its queued messages are finished first).

        May be called from the subscription's own handler.
        """
        if sub not in self._subs:
            return
        self._subs.remove(sub)
        self._rebuild_routes()
        self._on_drained()  # its queue no longer holds the reader back
        self._update_reader()
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

    def pause(self, *subs: Subscription) -> None:
        """Call no handler until resume(); nothing is lost, memory stays bounded.

        With subscriptions, only those; without, all of them and the ones added later.
        """
        if not subs:
            self._paused = True
        for sub in subs or self._subs:
            sub.pause()
        self._update_reader()

    def resume(self, *subs: Subscription) -> None:
        """Call handlers again (with subscriptions, only theirs)."""
        if not subs:
            self._paused = False
        for sub in subs or self._subs:
            sub.resume()
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

    async def _connect_until(self, deadline: float | None, *, starting: bool) -> int:
        """Connect, retrying with backoff until ``deadline``; return the attempts it took."""
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._connect()
                return attempt
            except (ConnectionFailed, ConnectionLost) as exc:
                self._last_error = str(exc)
                if starting and isinstance(exc, ConnectionFailed):
                    if not driver.worth_waiting(exc):
                        raise
                delay = self.backoff.delay(attempt - 1)
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise ConnectionFailed(
                        f"{exc} (gave up after {attempt} attempt(s))"
                    ) from exc.__cause__
                log.log(
                    logging.WARNING if worth_logging(attempt) else logging.DEBUG,
                    "%s attempt %d failed: %s; next in %.1fs",
                    "connection" if starting else "reconnect",
                    attempt,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _close_conn(self) -> None:
        self._set_reader(False)
        conn, self._conn = self._conn, None
        self._fail_command(ConnectionLost("connection closed"))
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), self.command_timeout)
            except Exception:  # closing a broken connection can fail; it is gone either way
                log.debug("error closing connection", exc_info=True)

    def _connection_lost(self, why: str) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(why)
        self._set_reader(False)
        self._fail_command(ConnectionLost(f"connection lost: {why}"))

    async def _supervise(self) -> None:
        while True:
            assert self._lost is not None
            why = await self._lost
            lost_at = time.time()
            self._last_error = why
            self._state = "reconnecting"
            log.warning("connection lost (%s); reconnecting", why)
            await self._close_conn()
            await asyncio.sleep(self.backoff.delay(0))
            attempts = await self._connect_until(None, starting=False)
            self._reconnects += 1
            self._fire_gap(Gap(lost_at, time.time(), attempts, why))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat / 2)
            if self._state != "listening" or self._conn is None:
                continue
            if not self._reading_wanted():
                # A probe would have to read past the bound: ask the kernel instead.
                trouble = socket_trouble(self._conn.pgconn.socket)
                if trouble:
                    self._connection_lost(trouble)
            elif time.monotonic() - self._last_read >= self.heartbeat:
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

    # -- commands on the listening connection ------------------------------------

    async def _command(self, query: psycopg.sql.Composable) -> None:
        """Run one statement on the listening connection; its result comes through the reader.

        The command waits while reading is held back (a full queue): only a
        connection that stays silent while it could be read counts as lost.
        """
        async with self._command_lock:
            conn = self._conn
            if conn is None or self._state != "listening":
                return  # LISTEN happens on (re)connect
            assert self._loop is not None
            done = self._command_result = self._loop.create_future()
            try:
                conn.pgconn.send_query(query.as_bytes(conn))
                while conn.pgconn.flush():
                    await asyncio.sleep(0.001)
                self._update_reader()
                while not done.done():
                    await asyncio.wait([done], timeout=self.command_timeout)
                    silent = time.monotonic() - self._last_read >= self.command_timeout
                    if not done.done() and self._reading_wanted() and silent:
                        self._connection_lost("no answer within the command timeout")
                done.result()
            except psycopg.OperationalError as exc:
                self._connection_lost(f"{type(exc).__name__}: {exc}")
                raise ConnectionLost(f"connection lost: {exc}") from exc
            finally:
                self._command_result = None

    def _fail_command(self, exc: Exception) -> None:
        done = self._command_result
        if done is not None and not done.done():
            done.set_exception(exc)

    def _collect_result(self, pgconn: Any) -> None:
        """The pending command's result, once libpq has all of it."""
        done = self._command_result
        if done is None or done.done() or pgconn.is_busy():
            return
        error = None
        while (result := pgconn.get_result()) is not None:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                error = (result.error_message or b"").decode(errors="replace").strip()
        if error:
            done.set_exception(DatabaseError(f"the server refused a command: {error}"))
        else:
            done.set_result(None)

    async def _listen_now(self, channels: list[str]) -> None:
        if channels:
            try:
                await self._command(listen_sql(channels))
            except ConnectionLost:
                pass  # the reconnect LISTENs to every channel

    async def _unlisten_now(self, channels: list[str]) -> None:
        if channels:
            try:
                await self._command(unlisten_sql(channels))
            except ConnectionLost:
                pass  # the reconnect LISTENs only to the channels still wanted

    # -- reading ---------------------------------------------------------------

    def _reading_wanted(self) -> bool:
        # While every handler is paused the server keeps the notifications,
        # unless a command's result must be read.
        return (
            not self._backpressured
            and self._conn is not None
            and self._state == "listening"
            and (
                self._command_result is not None
                or not self._subs
                or any(s.open for s in self._subs)
            )
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

    def _room(self) -> int:
        """How many notifications every subscription can still take."""
        return min((s.max_pending - s.held for s in self._subs), default=self.max_pending)

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        pgconn = conn.pgconn
        room = self._room()
        if room <= 0:
            self._after_routing([])
            return
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as exc:
            self._connection_lost(str(exc))
            return
        if pgconn.status != pq.ConnStatus.OK:
            self._connection_lost("the server closed the connection")
            return
        self._last_read = time.monotonic()
        # Take at most ``room``: the rest stays in libpq (one socket read at most)
        # and the reader stops until the handlers have made room.
        notifies = pgconn.notifies
        routes = self._routes
        woken: list[Subscription] = []
        new = tuple.__new__  # Notify(...) without the namedtuple's Python-level __new__
        while room > 0:
            n = notifies()
            if n is None:
                self._collect_result(pgconn)
                break
            room -= 1
            route = routes.get(n.relname)
            if route is not None:
                msg = new(Notify, (n.be_pid, route.channel, n.extra.decode()))
                for sub in route.subs:
                    queue = sub.queue
                    if not queue:
                        woken.append(sub)
                    queue.append(msg)
        self._after_routing(woken)

    def _on_driver_notify(self, n: psycopg.Notify) -> None:
        # Notifications psycopg received while running the LISTEN of a (re)connect.
        route = self._routes.get(n.channel.encode())
        if route is None:
            return
        msg = Notify(n.pid, route.channel, n.payload)
        woken = [s for s in route.subs if not s.queue]
        for sub in route.subs:
            sub.queue.append(msg)
        self._after_routing(woken)

    def _after_routing(self, woken: list[Subscription]) -> None:
        for sub in woken:
            sub.wake()
        for sub in self._subs:
            if sub.full:
                if not self._backpressured:
                    log.debug("backpressure: %r holds %d", sub, sub.held)
                self._backpressured = True
                self._set_reader(False)
                break

    def _on_drained(self) -> None:
        if self._backpressured and not any(s.held > s.max_pending // 2 for s in self._subs):
            self._backpressured = False
            self._update_reader()
