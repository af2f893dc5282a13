"""Durable channels: stored messages, claimed by id, processed exactly once.

A channel with ``lock_notifications = True`` is durable:

* ``notify()`` inserts the message into ``pgpubsub.message`` in the
  publisher's transaction and sends a wake-up NOTIFY on the channel; the
  payload is not in the NOTIFY, so it has no size limit, and identical
  messages in one transaction are separate rows, each processed.
* Workers claim due messages of a channel in batches with
  ``FOR UPDATE SKIP LOCKED`` (never the same row twice at once), counting the
  attempt in a short transaction of its own, then lock them again, run the
  listeners and complete the messages in one transaction (deleted, or kept as
  ``done`` for the channel's ``retention`` seconds). Database writes
  that listeners make through :func:`connection` commit atomically with that
  completion: each message's effects happen exactly once, across any number of
  workers and processes. A worker that dies mid-batch holds no lock once its
  connection is gone; the batch is claimed again by another worker.
* A listener that raises rolls back only its own message (the batch is
  re-run with a savepoint per message); the message is retried after an
  exponential delay with jitter, up to the channel's ``max_attempts``; then
  it is kept as ``dead`` with the error and traceback, and can be replayed
  (:mod:`pgpubsub.messages`, ``pgpubsub messages``). A message whose worker
  dies in the handler every time is counted too, and ends dead.
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
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from importlib import resources
from typing import Any

import psycopg

from . import driver, integration
from .backoff import Backoff
from .channel import ChannelSpec
from .engine import Engine, Gap
from .errors import ConnectionLost
from .listen import ListenerSpec, Registry
from .session import Session

__all__ = [
    "DurableRunner",
    "PsycopgSession",
    "astore",
    "connection",
    "default_session",
    "migrate",
    "process_stored_notifications",
    "store",
]

log = logging.getLogger("pgpubsub.durable")

# Payloads travel as one text of JSON lines (see notify.NOTIFY_MANY_SQL).
STORE_SQL = (
    "WITH ins AS (INSERT INTO pgpubsub.message (channel, payload) "
    "SELECT %s, x FROM unnest(pg_catalog.string_to_array(%s, E'\\n')) AS x RETURNING id) "
    "SELECT array_agg(id ORDER BY id), pg_catalog.pg_notify(%s, '') FROM ins"
)
# Claiming counts the attempt and commits at once, so a message whose worker
# dies in the handler (SIGKILL, OOM, power loss) still uses up its attempts.
# The row is leased until the retry delay of that attempt: if the worker dies
# it is claimed again then; while the worker is alive it holds the row lock.
CLAIM_SQL = """
WITH due AS (
    SELECT id FROM pgpubsub.message
    WHERE channel = %(channel)s AND status = 'pending' AND run_at <= now()
    ORDER BY run_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
UPDATE pgpubsub.message m SET
    attempts = m.attempts + 1,
    run_at = now() + make_interval(secs => least(%(cap)s, %(base)s * power(2, m.attempts))),
    status = CASE WHEN m.attempts >= %(max)s THEN 'dead' ELSE 'pending' END,
    last_error = CASE WHEN m.attempts >= %(max)s
        THEN 'the process handling it stopped before it completed, ' || m.attempts || ' times'
        ELSE m.last_error END
FROM due WHERE m.id = due.id
RETURNING m.id, m.payload, m.attempts, m.status
"""
LOCK_SQL = "SELECT id, attempts FROM pgpubsub.message WHERE id = ANY(%s) FOR UPDATE SKIP LOCKED"
DELETE_SQL = "DELETE FROM pgpubsub.message WHERE id = ANY(%s)"
KEEP_SQL = (
    "UPDATE pgpubsub.message SET status = 'done', completed_at = now(), last_error = NULL "
    "WHERE id = ANY(%s)"
)
EXPIRE_SQL = (
    "DELETE FROM pgpubsub.message WHERE channel = %s AND status = 'done' "
    "AND completed_at < now() - make_interval(secs => %s)"
)
RETRY_SQL = (
    "UPDATE pgpubsub.message SET last_error = %s, "
    "run_at = now() + make_interval(secs => %s), "
    "status = CASE WHEN attempts >= %s THEN 'dead' ELSE 'pending' END WHERE id = %s"
)

_connection: contextvars.ContextVar[Any] = contextvars.ContextVar("pgpubsub_durable_connection")


def connection() -> Any:
    """The connection of the claim transaction, inside a durable listener.

    Writes made through it commit if and only if the message completes. Under
    Django it is Django's connection (the ORM writes there already).
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
    """Install or upgrade the pgpubsub schema (idempotent)."""
    with driver.connect(driver.build_conninfo(dsn), autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('pgpubsub.migrate'))")
        conn.execute(schema_sql().encode())


def store(conn: Any, spec: ChannelSpec, lines: str) -> list[int]:
    """Insert messages in ``conn``'s transaction and wake the workers; return their ids.

    ``lines``: the encoded messages, one JSON document per line
    (:meth:`ChannelSpec.encode_lines`). ``conn`` is any DB-API connection with
    ``cursor()`` (psycopg 3, psycopg2, Django's), so the messages join whatever
    transaction the caller is in.
    """
    with conn.cursor() as cur:
        cur.execute(STORE_SQL, [spec.name, lines, spec.name])
        row = cur.fetchone()
    return list(row[0] or [])


async def astore(conn: psycopg.AsyncConnection[Any], spec: ChannelSpec, lines: str) -> list[int]:
    cur = await conn.execute(STORE_SQL, [spec.name, lines, spec.name])
    row = await cur.fetchone()
    return list(row[0] or []) if row else []


# -- processing ---------------------------------------------------------------------


class PsycopgSession(Session):
    """The claim session on a psycopg 3 connection of its own."""

    def __init__(self, conninfo: str):
        self.conninfo = conninfo
        self.conn: psycopg.Connection[Any] | None = None

    def open(self) -> None:
        if self.conn is None or self.conn.closed:
            self.conn = driver.connect(self.conninfo, autocommit=False)

    @property
    def connection(self) -> Any:
        return self.conn

    def atomic(self) -> AbstractContextManager[Any]:
        assert self.conn is not None
        return self.conn.transaction()

    def execute(self, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
        assert self.conn is not None
        cur = self.conn.execute(query, params)
        return cur.fetchall() if cur.description else []

    def pipeline(self) -> AbstractContextManager[Any]:
        assert self.conn is not None
        return self.conn.pipeline() if psycopg.Pipeline.is_supported() else nullcontext()

    def late_error(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.Error)

    def broken(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.OperationalError | ConnectionLost)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


class _ChannelProcessor:
    """Claims and processes one durable channel, in a thread with its own session."""

    def __init__(
        self,
        session: Session,
        spec: ChannelSpec,
        listeners: list[ListenerSpec],
        *,
        batch_size: int = 500,
        batch_seconds: float = 0.25,
        poll_interval: float = 1.0,
    ):
        self.session = session
        self.spec = spec
        self.listeners = listeners
        # Batches adapt: as large as batch_size when listeners are fast, down to
        # one message when they are slow, so that no worker holds many messages
        # that another could be processing.
        self.batch_size = batch_size
        self.batch_seconds = batch_seconds
        self.claim_size = min(batch_size, 50)
        self.poll_interval = poll_interval
        cls = spec.cls
        self.max_attempts = int(cls.max_attempts)
        self.retention = float(cls.retention)
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

    def drain_once(self) -> int:
        """Process due messages batch by batch until none is left; return how many completed."""
        self.session.open()
        before = self.processed
        while not self.stopping.is_set():
            asked = self.claim_size
            if self._batch() < asked:
                break
        if self.retention:
            with self.session.atomic():
                self.session.execute(EXPIRE_SQL, (self.spec.name, self.retention))
        return self.processed - before

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.drain_once()
            except Exception as exc:
                if not self.session.broken(exc):
                    log.exception("durable channel %s: unexpected error", self.spec.name)
                else:
                    log.warning("durable channel %s: connection problem: %s", self.spec.name, exc)
                self.session.close()
            self.wake.wait(self.poll_interval)
            self.wake.clear()
        self.session.close()
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
            if listener.accepts(message):
                self._call(listener, message)

    def _claim(self) -> list[tuple[Any, ...]]:
        params = {
            "channel": self.spec.name,
            "limit": self.claim_size,
            "max": self.max_attempts,
            "base": self.backoff.base,
            "cap": self.backoff.cap,
        }
        with self.session.atomic():
            return self.session.execute(CLAIM_SQL, params)

    def _batch(self) -> int:
        claimed = self._claim()
        rows = []
        for mid, payload, attempts, status in sorted(claimed):
            if status == "dead":
                log.error(
                    "message %s on %s is dead: its worker stopped during each of %d attempts",
                    mid,
                    self.spec.path,
                    attempts - 1,
                    extra={"channel": self.spec.name, "message_id": mid, "attempt": attempts},
                )
            else:
                rows.append((mid, payload, attempts))
        if rows:
            started = time.monotonic()
            self._process(rows)
            per_message = (time.monotonic() - started) / len(rows)
            fits = int(self.batch_seconds / max(per_message, 1e-6))
            self.claim_size = max(1, min(self.batch_size, (self.claim_size + fits) // 2))
        return len(claimed)

    def _process(self, claimed: list[tuple[Any, ...]]) -> None:
        session = self.session
        token = _connection.set(session.connection)
        try:
            with session.atomic():
                locked = dict(session.execute(LOCK_SQL, ([r[0] for r in claimed],)))
                # A row claimed again by someone else since (lease over) is theirs.
                rows = [r for r in claimed if locked.get(r[0]) == r[2]]
                failed_at = 0
                try:
                    # Fast path: the whole batch in one savepoint, its statements
                    # pipelined (listeners' writes do not wait for a round trip).
                    with session.pipeline(), session.atomic():
                        for failed_at, (_, payload, _) in enumerate(rows):  # noqa: B007
                            self._handle(payload)
                        self._complete([r[0] for r in rows])
                    self.processed += len(rows)
                except Exception as exc:
                    # Redo one savepoint each. A listener that raised is not run
                    # twice; a database error may have surfaced late (pipeline),
                    # so then every message is run again, one at a time.
                    self._careful(rows, None if session.late_error(exc) else failed_at, exc)
        finally:
            _connection.reset(token)

    def _complete(self, ids: list[int]) -> None:
        if ids:
            self.session.execute(KEEP_SQL if self.retention else DELETE_SQL, (ids,))

    def _careful(
        self, rows: list[tuple[Any, ...]], failed_at: int | None, first_error: Exception
    ) -> None:
        done = []
        for index, (mid, payload, attempts) in enumerate(rows):
            try:
                if index == failed_at:
                    raise first_error
                with self.session.atomic():
                    self._handle(payload)
                done.append(mid)
            except Exception as exc:
                self._failed(mid, attempts, exc)
        self._complete(done)
        self.processed += len(done)

    def _failed(self, mid: int, attempt: int, exc: Exception) -> None:
        self.failed += 1
        error = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        delay = self.backoff.delay(attempt - 1)
        self.session.execute(RETRY_SQL, (error, delay, self.max_attempts, mid))
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
        self,
        engine: Engine,
        channels: list[ChannelSpec],
        registry: Registry,
        session_factory: Callable[[], Session] | None = None,
        **opts: Any,
    ):
        self.engine = engine
        make = session_factory or (lambda: PsycopgSession(engine.conninfo))
        self.processors = [
            _ChannelProcessor(make(), spec, registry.listeners(spec), **opts) for spec in channels
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


def default_session(dsn: str = "") -> Session:
    """Django's connection when pgpubsub is an installed app and no dsn is given, else psycopg."""
    if not dsn and integration.django_connection() is not None:
        from .djangodb import DjangoSession

        return DjangoSession()
    return PsycopgSession(driver.build_conninfo(dsn))


def process_stored_notifications(
    channels: list[Any] | None = None, dsn: str = "", registry: Registry | None = None
) -> int:
    """Process every due stored message of durable channels now; return how many completed.

    ``channels``: channel classes or dotted paths (default: every registered
    durable channel). Each batch is its own short transaction, so this never
    holds one transaction over the backlog.
    """
    from .channel import resolve_channel
    from .listen import registry as default_registry

    reg = registry or default_registry
    specs = (
        [resolve_channel(c) for c in channels]
        if channels
        else [s for s in reg.channels() if s.lock]
    )
    session = default_session(dsn)
    try:
        return sum(
            _ChannelProcessor(session, spec, reg.listeners(spec)).drain_once() for spec in specs
        )
    finally:
        session.close()
