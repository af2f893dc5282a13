"""Durable channels: stored messages, claimed by id, processed exactly once.

A channel with ``lock_notifications = True`` is durable:

* ``notify()`` inserts the message into ``pgpubsub.message`` in the
  publisher's transaction and sends a wake-up NOTIFY on the channel; the
  payload is not in the NOTIFY, so it has no size limit, and identical
  messages in one transaction are separate rows, each processed.
* Workers claim due messages of a channel in batches with
  ``FOR UPDATE SKIP LOCKED`` (never the same row twice at once), run the
  listeners, and delete the messages in the same transaction. Database writes
  that listeners make through :func:`connection` commit atomically with that
  completion: each message's effects happen exactly once, across any number of
  workers and processes. A worker that dies mid-batch holds no lock once its
  connection is gone; the batch is claimed again by another worker.
* A listener that raises rolls back only its own message (the batch is
  re-run with a savepoint per message); the message is retried after an
  exponential delay with jitter, up to the channel's ``max_attempts``; then
  it is kept as ``dead`` with the error and traceback, and can be replayed
  with :func:`replay`.
* Missed wake-ups (no worker running, a reconnect gap) are covered by polling:
  each worker looks for due messages every ``poll_interval`` seconds anyway.

External side effects (an e-mail, an HTTP call) are at-least-once: a worker
can die after the side effect and before the commit.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import traceback
from importlib import resources
from typing import Any

import psycopg

from . import driver
from .backoff import Backoff
from .channel import ChannelSpec
from .engine import Engine, Gap
from .errors import ConnectionLost
from .listen import ListenerSpec, Registry

__all__ = [
    "DurableRunner",
    "astore",
    "connection",
    "dead",
    "migrate",
    "process_stored_notifications",
    "purge",
    "replay",
    "store",
]

log = logging.getLogger("pgpubsub.durable")

STORE_SQL = (
    "WITH ins AS (INSERT INTO pgpubsub.message (channel, payload) "
    "SELECT %s, x FROM unnest(%s::text[]) AS x RETURNING id) "
    "SELECT array_agg(id ORDER BY id), pg_catalog.pg_notify(%s, '') FROM ins"
)
CLAIM_SQL = (
    "SELECT id, payload, attempts FROM pgpubsub.message "
    "WHERE channel = %s AND status = 'pending' AND run_at <= now() "
    "ORDER BY run_at, id LIMIT %s FOR UPDATE SKIP LOCKED"
)
DONE_SQL = "DELETE FROM pgpubsub.message WHERE id = ANY(%s)"
RETRY_SQL = (
    "UPDATE pgpubsub.message SET attempts = attempts + 1, last_error = %s, "
    "run_at = now() + make_interval(secs => %s), "
    "status = CASE WHEN attempts + 1 >= %s THEN 'dead' ELSE 'pending' END WHERE id = %s"
)

_connection: contextvars.ContextVar[psycopg.Connection[Any]] = contextvars.ContextVar(
    "pgpubsub_durable_connection"
)


def connection() -> psycopg.Connection[Any]:
    """The connection of the claim transaction, inside a durable listener.

    Writes made through it commit if and only if the message completes.
    """
    try:
        return _connection.get()
    except LookupError:
        raise LookupError(
            "pgpubsub.durable.connection() is only set inside a durable listener"
        ) from None


def schema_sql() -> str:
    return resources.files("pgpubsub").joinpath("sql/schema.sql").read_text()


def migrate(dsn: str = "") -> None:
    """Install or upgrade the durable-channel schema (idempotent)."""
    with driver.connect(driver.build_conninfo(dsn), autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('pgpubsub.migrate'))")
        conn.execute(schema_sql().encode())


def store(conn: Any, spec: ChannelSpec, payloads: list[str]) -> list[int]:
    """Insert messages in ``conn``'s transaction and wake the workers; return their ids."""
    with conn.cursor() as cur:
        cur.execute(STORE_SQL, [spec.name, payloads, spec.name])
        row = cur.fetchone()
    return list(row[0] or [])


async def astore(
    conn: psycopg.AsyncConnection[Any], spec: ChannelSpec, payloads: list[str]
) -> list[int]:
    cur = await conn.execute(STORE_SQL, [spec.name, payloads, spec.name])
    row = await cur.fetchone()
    return list(row[0] or []) if row else []


# -- processing ---------------------------------------------------------------------


class _ChannelProcessor:
    """Claims and processes one durable channel, in a thread with its own connection."""

    def __init__(
        self,
        dsn: str,
        spec: ChannelSpec,
        listeners: list[ListenerSpec],
        *,
        batch_size: int = 100,
        poll_interval: float = 1.0,
    ):
        self.dsn = dsn
        self.spec = spec
        self.listeners = listeners
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        cls = spec.cls
        self.max_attempts = int(cls.max_attempts)
        self.backoff = Backoff(base=float(cls.retry_delay), cap=float(cls.retry_max_delay))
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.processed = 0
        self.failed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"pgpubsub-durable:{spec.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self.stopping.set()
        self.wake.set()
        self._thread.join(timeout)

    def drain_once(self, conn: psycopg.Connection[Any]) -> int:
        """Process due messages batch by batch until none is left; return how many."""
        total = 0
        while not self.stopping.is_set():
            n = self._batch(conn)
            total += n
            if n < self.batch_size:
                return total
        return total

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self.stopping.is_set():
            try:
                if conn is None or conn.closed:
                    conn = driver.connect(driver.build_conninfo(self.dsn), autocommit=False)
                self.drain_once(conn)
            except (psycopg.OperationalError, ConnectionLost) as exc:
                log.warning("durable channel %s: connection problem: %s", self.spec.name, exc)
                if conn is not None:
                    conn.close()
                conn = None
            self.wake.wait(self.poll_interval)
            self.wake.clear()
        if conn is not None:
            conn.close()
        if self._loop is not None:
            self._loop.close()

    def _call(self, listener: ListenerSpec, message: Any) -> None:
        result = listener.call(message)
        if listener.is_async:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(result)

    def _handle(self, payload: str) -> None:
        message = self.spec.decode(payload)
        for listener in self.listeners:
            self._call(listener, message)

    def _batch(self, conn: psycopg.Connection[Any]) -> int:
        token = _connection.set(conn)
        try:
            with conn.transaction():
                rows = conn.execute(CLAIM_SQL, (self.spec.name, self.batch_size)).fetchall()
                if not rows:
                    return 0
                failed_at = 0
                try:
                    # Fast path: the whole batch in one transaction, one savepoint.
                    with conn.transaction():
                        for failed_at, (_, payload, _) in enumerate(rows):  # noqa: B007
                            self._handle(payload)
                        conn.execute(DONE_SQL, ([r[0] for r in rows],))
                    self.processed += len(rows)
                except Exception as exc:
                    # Redo the others one savepoint each; the failed one is not run twice.
                    self._careful(conn, rows, failed_at, exc)
            return len(rows)
        finally:
            _connection.reset(token)

    def _careful(
        self,
        conn: psycopg.Connection[Any],
        rows: list[tuple[Any, ...]],
        failed_at: int,
        first_error: Exception,
    ) -> None:
        done = []
        for index, (mid, payload, attempts) in enumerate(rows):
            try:
                if index == failed_at:
                    raise first_error
                with conn.transaction():
                    self._handle(payload)
                done.append(mid)
            except Exception as exc:
                self._failed(conn, mid, attempts + 1, exc)
        if done:
            conn.execute(DONE_SQL, (done,))
        self.processed += len(done)

    def _failed(
        self, conn: psycopg.Connection[Any], mid: int, attempt: int, exc: Exception
    ) -> None:
        self.failed += 1
        error = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        delay = self.backoff.delay(attempt - 1)
        conn.execute(RETRY_SQL, (error, delay, self.max_attempts, mid))
        final = attempt >= self.max_attempts
        log.log(
            logging.ERROR if final else logging.WARNING,
            "message %s on %s failed (attempt %d of %d): %r%s",
            mid,
            self.spec.path,
            attempt,
            self.max_attempts,
            exc,
            "; now dead" if final else f"; retry in {delay:.1f}s",
            extra={"channel": self.spec.name, "message_id": mid, "attempt": attempt},
        )


class DurableRunner:
    """The durable side of a worker: one processor per channel, woken by NOTIFY and a poll."""

    def __init__(
        self, engine: Engine, channels: list[ChannelSpec], registry: Registry, **opts: Any
    ):
        self.engine = engine
        self.processors = [
            _ChannelProcessor(engine.conninfo, spec, registry.listeners(spec), **opts)
            for spec in channels
        ]

    async def start(self, recover: bool = False) -> None:
        # Stored messages are always processed at start; --recover is kept for
        # compatibility and means the same.
        for proc in self.processors:
            await self.engine.subscribe(proc.spec.name, self._waker(proc), thread=False)
            proc.start()
        self.engine.add_gap_handler(self._wake_all)

    def _wake_all(self, gap: Gap) -> None:
        for proc in self.processors:
            proc.wake.set()

    @staticmethod
    def _waker(proc: _ChannelProcessor) -> Any:
        def wake(_msg: Any) -> None:
            proc.wake.set()

        return wake

    async def stop(self, timeout: float) -> None:
        await asyncio.gather(*(asyncio.to_thread(p.stop, timeout) for p in self.processors))


def process_stored_notifications(
    channels: list[Any] | None = None, dsn: str = "", registry: Registry | None = None
) -> int:
    """Process every due stored message of durable channels now; return how many.

    ``channels``: channel classes or dotted paths (default: every registered
    durable channel). Each batch is its own short transaction.
    """
    from .channel import resolve_channel
    from .listen import registry as default_registry

    reg = registry or default_registry
    specs = (
        [resolve_channel(c) for c in channels]
        if channels
        else [s for s in reg.channels() if s.lock]
    )
    conninfo = driver.build_conninfo(dsn)
    total = 0
    with driver.connect(conninfo, autocommit=False) as conn:
        for spec in specs:
            total += _ChannelProcessor(conninfo, spec, reg.listeners(spec)).drain_once(conn)
    return total


# -- operations on stored messages ----------------------------------------------------


def dead(conn: psycopg.Connection[Any], channel: str | None = None) -> list[dict[str, Any]]:
    """Dead messages (all channels, or one wire name), oldest first."""
    rows = conn.execute(
        "SELECT id, channel, payload, attempts, last_error, created_at FROM pgpubsub.message "
        "WHERE status = 'dead' AND (%s::text IS NULL OR channel = %s) ORDER BY id",
        (channel, channel),
    ).fetchall()
    keys = ("id", "channel", "payload", "attempts", "last_error", "created_at")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def replay(
    conn: psycopg.Connection[Any], ids: list[int] | None = None, channel: str | None = None
) -> int:
    """Make dead messages pending again (attempts reset) and wake the workers."""
    cur = conn.execute(
        "UPDATE pgpubsub.message SET status = 'pending', attempts = 0, run_at = now() "
        "WHERE status = 'dead' AND (%s::bigint[] IS NULL OR id = ANY(%s)) "
        "AND (%s::text IS NULL OR channel = %s) RETURNING channel",
        (ids, ids, channel, channel),
    )
    channels = {r[0] for r in cur.fetchall()}
    for name in channels:
        conn.execute("SELECT pg_catalog.pg_notify(%s, '')", (name,))
    return cur.rowcount


def purge(conn: psycopg.Connection[Any], status: str = "dead", channel: str | None = None) -> int:
    """Delete stored messages of a status ('dead' or 'pending')."""
    cur = conn.execute(
        "DELETE FROM pgpubsub.message WHERE status = %s AND (%s::text IS NULL OR channel = %s)",
        (status, channel, channel),
    )
    return cur.rowcount
