"""Results of durable messages, awaiting them, and batches (fan-in).

A durable channel declared with ``results=True`` keeps each message's
outcome: the value its listener returned (stored as JSON, typed by the
channel's class attribute ``Result`` when set), or, for a dead message, its
final error. The value is stored by the statement that completes the message,
in the transaction that commits its listener's writes: never one without the
other. Outcomes are kept for the channel's ``retention``, a day when that is 0
(:data:`pgpubsub.channel.RESULT_RETENTION`).

``pgpubsub.notify(Job(...), conn=conn)`` on such a channel returns a
:class:`Handle`: the message id (an ``int``, as before) that can wait::

    handle = pgpubsub.notify(Resize(image_id=7), conn=conn)
    conn.commit()
    thumbnail = handle.result_sync(timeout=30)   # or: await handle.result(timeout=30)

``result`` returns the value, or raises :class:`~pgpubsub.errors.MessageFailed`
(dead: its id and error text), :class:`~pgpubsub.errors.MessageCancelled`
(cancelled, purged, or its outcome swept after the retention), or
:class:`~pgpubsub.errors.ResultTimeout` (a ``TimeoutError``: nothing happens
to the message). It works on a message that completed long ago, and from any
process: ``pgpubsub.handle(Resize, message_id)`` rebuilds one.

The waits of one event loop on one server share a connection (one
``result_sync`` call runs a loop of its own, so it holds one while it
waits): it LISTENs on ``pgpubsub.done`` (on which workers announce each
settled message of a results channel, with its id, as they commit), reads
the states of the messages waited for in one statement, and reads a message
again on each announcement of its id, on every ``poll`` seconds (5: a message that died of
crashes, or was cancelled before it ran, is not announced), and after a lost
connection (reconnected with backoff until the timeout). That connection goes
to, in order: the ``dsn`` given to ``result()`` or :func:`handle`; the
server, database, user and password of the connection the message was
published on (psycopg 3, or Django's on psycopg 3); else ``$PGPUBSUB_DSN``
and the libpq environment. ``timeout`` bounds the whole wait, connecting
included. The outcome is read through ``pgpubsub.outcome(id, channel)``: one
message of the handle's channel (``pgpubsub grant --awaiter``; a result or an
error may quote the payload, so publishers cannot read it).

Batches: ``pgpubsub.batch([Resize(...), ...], on_complete=Done(...), conn=conn)``
publishes the members (durable messages, on one channel or several) in one
statement (``pgpubsub.publish_batch``: whole or not at all, on an autocommit
connection too; the only writer of batch rows and members' batch ids) and,
once every member has settled (done, dead, or cancelled), publishes
``on_complete`` exactly once, with the counts under the key ``batch`` of its
payload (declare ``batch: pgpubsub.BatchOutcome | None = None`` on the
callback channel to read them). The statement that settles a member (done,
dead, or deleted while pending: cancelled or purged) moves its batch's counts
under the batch row's lock; the transaction that settles the last pending one
publishes the callback, and a worker that dies publishes nothing (its
transaction rolls back, and the member's next attempt settles it). A dead
member replayed before then counts by its new outcome, one replayed after is
not counted again; a member deleted once settled (the retention's sweep)
keeps its count. A completed member is kept as ``done`` (swept after its
channel's retention, or a day), and finished batches whose members are gone
are deleted after it too.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import weakref
from collections import defaultdict
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from . import driver
from ._processor import DONE_CHANNEL
from .backoff import Backoff
from .channel import Channel, ChannelSpec, resolve_channel, spec_of
from .errors import (
    ConfigurationError,
    ConnectionFailed,
    MessageCancelled,
    MessageFailed,
    ResultTimeout,
    SchemaMismatch,
)

__all__ = ["Batch", "BatchOutcome", "Handle", "abatch", "batch", "conninfo_of", "handle"]

#: Seconds between reads of a waited-for message when no announcement comes.
POLL = 5.0
# The outcome of one message of one channel (schema: pgpubsub.outcome, `grant --awaiter`).
# The outcomes of the messages waited for, read at once (the hub of waiters).
READ_SQL = (
    "SELECT w.id, w.channel, o.status, o.result, o.last_error "
    "FROM ROWS FROM (pg_catalog.unnest(%s::bigint[]), pg_catalog.unnest(%s::text[])) "
    "AS w(id, channel) CROSS JOIN LATERAL pgpubsub.outcome(w.id, w.channel) AS o"
)
LISTEN_SQL = sql.SQL("LISTEN {}").format(sql.Identifier(DONE_CHANNEL))
RECONNECT = Backoff(base=0.2, factor=2, cap=5)
# A batch and its members in one statement (schema: pgpubsub.publish_batch):
# whole or not at all, on an autocommit connection too.
BATCH_SQL = "SELECT batch_id, members FROM pgpubsub.publish_batch(%s, %s, %s, %s)"


@dataclass(frozen=True)
class BatchOutcome:
    """The counts a batch's callback carries (its payload's ``batch`` key)."""

    id: int
    total: int
    done: int
    dead: int
    cancelled: int


def conninfo_of(conn: Any) -> str | None:
    """The conninfo of an open psycopg 3 connection (Django's too), password included.

    None for other drivers (psycopg 2 hides the password): then handles use
    ``$PGPUBSUB_DSN``.
    """
    raw = getattr(conn, "connection", conn)  # Django's wrapper holds the driver's connection
    pgconn = getattr(raw, "pgconn", None)
    if pgconn is None:
        return None
    try:
        options = {
            o.keyword.decode(): o.val.decode()
            for o in pgconn.info
            if o.val is not None and o.keyword != b"replication"
        }
    except (psycopg.Error, UnicodeDecodeError):
        return None
    # psycopg resolves a host name itself and connects to one of its
    # addresses (hostaddr): keep the name, for libpq to resolve again (the
    # server may have moved since, or listen on another of its addresses).
    host = options.get("host", "")
    if host and not host.startswith("/") and "hostaddr" in options:
        del options["hostaddr"]
    return driver.build_conninfo(psycopg.conninfo.make_conninfo(**options))


class Handle(int):
    """A durable message's id that can wait for its outcome (a results channel).

    An ``int`` (equal to the id ``notify`` returned before): store it, send
    it, and rebuild it elsewhere with :func:`handle`.
    """

    spec: ChannelSpec
    conninfo: str | None

    def __new__(cls, message_id: int, spec: ChannelSpec, conninfo: str | None = None) -> Handle:
        made = super().__new__(cls, message_id)
        made.spec = spec
        made.conninfo = conninfo
        return made

    def __repr__(self) -> str:
        return f"<Handle {int(self)} on {self.spec.path}>"

    def __reduce__(self) -> Any:
        # No password in a pickle (it may be stored or sent anywhere): the
        # rebuilt handle finds it as libpq does (PGPASSWORD, a passfile).
        return (handle, (self.spec.path, int(self), _without_password(self.conninfo)))

    # -- what a row says (no I/O) -------------------------------------------------

    def _settled(self, row: tuple[Any, ...] | None) -> tuple[bool, Any]:
        """(settled, value) from the message's row; raises for a dead or vanished one."""
        if row is None:
            raise MessageCancelled(
                f"message {int(self)} on {self.spec.path} is gone: cancelled, purged, or its "
                "outcome was swept after the channel's retention"
            )
        status, result, error = row
        if status == "dead":
            raise MessageFailed(int(self), error or "")
        if status != "done":
            return False, None
        return True, self._decode(result)

    def _decode(self, text: str | None) -> Any:
        if text is None:
            return None
        kind = getattr(self.spec.cls, "Result", None)
        try:
            return (
                msgspec.json.decode(text) if kind is None else msgspec.json.decode(text, type=kind)
            )
        except msgspec.MsgspecError as exc:
            raise SchemaMismatch(
                f"the result of message {int(self)} on {self.spec.path} does not match "
                f"{kind!r}: {exc} (result: {text[:200]})"
            ) from exc

    def _target(self, dsn: str | None) -> str:
        if dsn:
            return driver.build_conninfo(dsn)
        return self.conninfo or driver.build_conninfo()

    # -- waiting --------------------------------------------------------------------

    def result_sync(self, timeout: float | None = None, *, dsn: str | None = None) -> Any:
        """Wait for the outcome (blocking); see :meth:`result`.

        Runs :meth:`result` on an event loop of its own (in a thread of its
        own when this thread runs one already), so that ``timeout`` bounds
        every step of the wait, connecting included.
        """
        _check_timeout(timeout)
        waiting = self.result(timeout, dsn=dsn)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return _run(waiting)
        outcome: list[Any] = []
        failure: list[BaseException] = []

        def wait() -> None:
            try:
                outcome.append(_run(waiting))
            except BaseException as exc:  # handed to the caller's thread
                failure.append(exc)

        thread = threading.Thread(target=wait, name=f"pgpubsub-result-{int(self)}", daemon=True)
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return outcome[0]

    async def result(self, timeout: float | None = None, *, dsn: str | None = None) -> Any:
        """Wait for the outcome: the listener's return value (decoded as the channel's ``Result``).

        Raises MessageFailed (dead), MessageCancelled (gone), ResultTimeout
        (``timeout`` seconds passed, whatever the wait was doing: connecting,
        reading, waiting; None waits for ever; a negative or NaN timeout is a
        ConfigurationError). Woken by the completion's NOTIFY, with a read
        every few seconds and after a reconnect as the fallback.
        """
        _check_timeout(timeout)
        if timeout is None:
            return await self._wait(dsn)
        try:
            return await asyncio.wait_for(self._wait(dsn), timeout)
        except asyncio.TimeoutError:
            raise ResultTimeout(
                f"message {int(self)} had no outcome within {timeout:g}s (it is left as it is)"
            ) from None

    async def _wait(self, dsn: str | None) -> Any:
        row = await _Hub.of(self._target(dsn)).outcome(int(self), self.spec.name)
        return self._settled(row)[1]


class _Hub:
    """The waits of one event loop on one server: one connection, one LISTEN, for all.

    A waiter registers its message (id and channel) and awaits a future that
    the hub sets to the message's final row (done or dead), or to None (gone),
    or fails with the error that ended the wait. The hub reads the messages of
    new waiters, of each announcement on ``pgpubsub.done``, all of them every
    POLL seconds and after a reconnect, in one statement each time. It runs
    while someone waits, and closes its connection when the last one leaves.
    """

    _hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Hub]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, target: str) -> None:
        self.target = target
        self.waiting: dict[int, list[tuple[str, asyncio.Future[Any]]]] = {}
        self.dirty: set[int] = set()  # ids to read now
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, target: str) -> _Hub:
        hubs = cls._hubs.setdefault(asyncio.get_running_loop(), {})
        hub = hubs.get(target)
        if hub is None:
            hub = hubs[target] = cls(target)
        return hub

    async def outcome(self, mid: int, channel: str) -> tuple[Any, ...] | None:
        """The final row of a message (status, result, error), or None when it is gone."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        entry = (channel, future)
        self.waiting.setdefault(mid, []).append(entry)
        self.dirty.add(mid)
        self.wake.set()
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())
        try:
            return await future  # type: ignore[no-any-return]
        finally:
            left = self.waiting.get(mid, [])
            if entry in left:
                left.remove(entry)
            if not left:
                self.waiting.pop(mid, None)
            self.wake.set()  # the last one gone: the hub stops
            if not self.waiting and self.task is not None:
                # Even while it connects (a server that never answers): the
                # next waiter starts a hub task of its own.
                self.task.cancel()
                self.task = None

    async def _run(self) -> None:
        failures = 0
        try:
            while self.waiting:
                try:
                    conn = await driver.connect_async(self.target)
                    async with conn:
                        await conn.execute(LISTEN_SQL)
                        failures = 0
                        await self._serve(conn)
                except (ConnectionFailed, psycopg.OperationalError) as exc:
                    if not _transient(exc):
                        raise
                    await asyncio.sleep(RECONNECT.delay(failures))
                    failures += 1
        except asyncio.CancelledError:
            raise  # no one waits any more (or the loop ends): nothing to hand over
        except BaseException as exc:  # handed to every waiter
            failure = exc
            if isinstance(exc, psycopg.Error):
                failure = driver.translate(exc, "waiting for results")
            for entries in list(self.waiting.values()):
                for _, future in entries:
                    if not future.done():
                        future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise

    async def _serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        loop = asyncio.get_running_loop()
        self.dirty.update(self.waiting)  # connected (again): read them all
        next_poll = loop.time() + POLL
        while self.waiting:
            if loop.time() >= next_poll:
                self.dirty.update(self.waiting)
                next_poll = loop.time() + POLL
            if self.dirty:
                await self._read(conn)
                continue
            self.wake.clear()
            await self._notified(conn, max(0.0, next_poll - loop.time()))

    async def _read(self, conn: psycopg.AsyncConnection[Any]) -> None:
        ids, channels = [], []
        for mid in self.dirty:
            for channel in {c for c, _ in self.waiting.get(mid, [])}:
                ids.append(mid)
                channels.append(channel)
        self.dirty.clear()
        cur = await conn.execute(READ_SQL, (ids, channels))
        rows = {(r[0], r[1]): r[2:] for r in await cur.fetchall()}
        for mid, channel in zip(ids, channels, strict=True):
            row = rows.get((mid, channel))
            if row is not None and row[0] not in ("done", "dead"):
                continue
            for their_channel, future in self.waiting.get(mid, []):
                if their_channel == channel and not future.done():
                    future.set_result(row)

    async def _notified(self, conn: psycopg.AsyncConnection[Any], timeout: float) -> None:
        """Wait for announcements (their ids marked to read), a new waiter, or the timeout."""

        async def announced() -> None:
            async for note in conn.notifies(timeout=timeout, stop_after=1):
                if note.payload.isdigit() and int(note.payload) in self.waiting:
                    self.dirty.add(int(note.payload))

        listening = asyncio.ensure_future(announced())
        woken = asyncio.ensure_future(self.wake.wait())
        try:
            await asyncio.wait({listening, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (listening, woken):
                task.cancel()
            await asyncio.gather(listening, woken, return_exceptions=True)
        if not listening.cancelled() and listening.exception() is not None:
            raise listening.exception()  # type: ignore[misc]


def _run(waiting: Coroutine[Any, Any, Any]) -> Any:
    """Run a wait on an event loop of its own (a selector loop: psycopg's async needs one)."""
    loop = asyncio.SelectorEventLoop() if sys.platform == "win32" else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(waiting)
    finally:
        try:  # as asyncio.run: what is left (a hub still connecting) cancelled first
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def _check_timeout(timeout: float | None) -> None:
    if timeout is None:
        return
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout < 0
    ):
        raise ConfigurationError(
            f"a result's timeout is None (no limit) or a finite number of seconds >= 0, "
            f"not {timeout!r}"
        )


def _without_password(conninfo: str | None) -> str:
    if not conninfo:
        return ""
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo("", **params)


def _transient(exc: Exception) -> bool:
    """Whether ``exc`` is a connection lost or refused for now (waited out)."""
    if isinstance(exc, ConnectionFailed):
        return driver.worth_waiting(exc)
    assert isinstance(exc, psycopg.Error)
    return exc.sqlstate is None or exc.sqlstate[:2] in ("08", "57")


def _results_spec(channel: Any) -> ChannelSpec:
    spec = resolve_channel(channel)
    if not (spec.lock and spec.cls.results):
        raise ConfigurationError(
            f"{spec.path} keeps no results: declare it with lock_notifications=True and "
            "results=True to wait for its messages"
        )
    return spec


def handle(channel: type[Any] | str, message_id: int, dsn: str = "") -> Handle:
    """A :class:`Handle` for a message of a results channel, by id (in any process).

    ``dsn``: where to wait (default ``$PGPUBSUB_DSN`` and the libpq environment).
    """
    if not isinstance(message_id, int) or isinstance(message_id, bool) or message_id < 1:
        raise ConfigurationError(f"a message id is a positive int, not {message_id!r}")
    return Handle(message_id, _results_spec(channel), driver.build_conninfo(dsn) if dsn else None)


class Batch(int):
    """A published batch: its id (``pgpubsub.batch``), and its members' ids."""

    members: tuple[int, ...]

    def __new__(cls, batch_id: int, members: tuple[int, ...]) -> Batch:
        made = super().__new__(cls, batch_id)
        made.members = members
        return made


@dataclass(frozen=True)
class _Plan:
    """A batch ready to store: the callback's channel and payload, and each member's."""

    callback: ChannelSpec
    payload: str
    channels: list[str]  # member i's channel
    payloads: list[str]  # member i's payload (JSON)

    @property
    def params(self) -> tuple[str, str, list[str], list[str]]:
        return (self.callback.name, self.payload, self.channels, self.payloads)


def _plan(messages: Iterable[Channel], on_complete: Channel) -> _Plan:
    """Check and encode a batch (no I/O): durable channels only, at least one member."""
    if not isinstance(on_complete, Channel):
        raise ConfigurationError(
            f"on_complete must be a channel instance (a durable channel), not {on_complete!r}"
        )
    callback = spec_of(type(on_complete))
    groups: dict[ChannelSpec, list[Channel]] = defaultdict(list)
    for message in messages:
        if not isinstance(message, Channel):
            raise ConfigurationError(f"a batch's members are channel instances, not {message!r}")
        groups[spec_of(type(message))].append(message)
    for spec in (callback, *groups):
        if not spec.lock:
            raise ConfigurationError(
                f"{spec.path} is a plain channel: a batch's members and its callback need "
                "durable channels (lock_notifications=True)"
            )
    if not groups:
        raise ConfigurationError("a batch needs at least one message")
    payload, _ = callback.encode_lines([on_complete])
    channels: list[str] = []
    payloads: list[str] = []
    for spec, group in groups.items():
        lines = spec.encode_lines(group)[0].split("\n")  # JSON holds no raw newline
        channels += [spec.name] * len(lines)
        payloads += lines
    return _Plan(callback, payload, channels, payloads)


def batch(messages: Iterable[Channel], *, on_complete: Channel, conn: Any = None) -> Batch:
    """Publish ``messages`` as a batch; ``on_complete`` is published once all have settled.

    ``messages``: instances of durable channels (one or several channels);
    ``on_complete``: an instance of a durable channel, published with the
    counts under its payload's ``batch`` key (:class:`BatchOutcome`). One
    statement: it joins the transaction of ``conn`` (as
    :func:`pgpubsub.notify`: a sync connection, or the default one), and is
    whole or not at all on an autocommit connection too. An empty batch is a
    ConfigurationError (there is nothing to wait for).
    """
    from .notify import _publishing, default_connection

    plan = _plan(messages, on_complete)
    conn = default_connection() if conn is None else conn
    with _publishing(plan.callback, len(plan.payloads)), conn.cursor() as cur:
        cur.execute(BATCH_SQL, plan.params)
        batch_id, members = cur.fetchone()
    return Batch(int(batch_id), tuple(members))


async def abatch(
    messages: Iterable[Channel], *, on_complete: Channel, conn: psycopg.AsyncConnection[Any]
) -> Batch:
    """:func:`batch` on an async psycopg connection."""
    from .notify import _publishing

    plan = _plan(messages, on_complete)
    with _publishing(plan.callback, len(plan.payloads)):
        cur = await conn.execute(BATCH_SQL, plan.params)
        row = await cur.fetchone()
    assert row is not None
    return Batch(int(row[0]), tuple(row[1]))
