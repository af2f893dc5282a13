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
  connection is gone; its messages are claimed again by another worker once
  their lease (the retry delay of that attempt) is over. Batches grow to 500
  messages while listeners are fast and shrink to one when they are slow;
  the listeners' writes in a batch are pipelined (psycopg 3).
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
from collections.abc import Callable
from importlib import resources
from typing import Any

import psycopg

from . import driver, integration
from .channel import ChannelSpec, resolve_channel
from .engine import Engine, Gap
from .errors import NoListener
from .listen import Registry
from .listen import registry as default_registry
from .processor import ChannelProcessor, current_connection
from .session import PsycopgSession, Session

__all__ = [
    "DurableRunner",
    "astore",
    "connection",
    "default_session",
    "migrate",
    "process_stored_notifications",
    "store",
]

# Payloads travel as one text of JSON lines (see notify.NOTIFY_MANY_SQL).
# ``trace``: the publisher's trace context (JSON, or NULL without OpenTelemetry).
STORE_SQL = (
    "WITH ins AS (INSERT INTO pgpubsub.message (channel, payload, trace) "
    "SELECT %s, x, %s::jsonb FROM pg_catalog.unnest(pg_catalog.string_to_array(%s, E'\\n')) AS x "
    "RETURNING id) "
    "SELECT pg_catalog.array_agg(id ORDER BY id), pg_catalog.pg_notify(%s, '') FROM ins"
)


def connection() -> Any:
    """The connection of the claim transaction, inside a durable listener.

    Writes made through it commit if and only if the message completes. Under
    Django it is Django's connection (the ORM writes there already).
    """
    try:
        return current_connection.get()
    except LookupError:
        raise LookupError(
            "pgpubsub.durable.connection() is only set inside a durable listener"
        ) from None


def schema_sql() -> str:
    return resources.files("pgpubsub").joinpath("sql/schema.sql").read_text()


def migrate(dsn: str = "") -> None:
    """Install or upgrade the pgpubsub schema (idempotent)."""
    with driver.connect(driver.build_conninfo(dsn), autocommit=False) as conn:
        try:
            conn.execute(
                "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgpubsub.migrate'))"
            )
            conn.execute(schema_sql().encode())
        except psycopg.Error as exc:
            raise driver.translate(exc, "installing the pgpubsub schema") from exc


def store(conn: Any, spec: ChannelSpec, lines: str, trace: str | None = None) -> list[int]:
    """Insert messages in ``conn``'s transaction and wake the workers; return their ids.

    ``lines``: the encoded messages, one JSON document per line
    (:meth:`ChannelSpec.encode_lines`); ``trace``: the publish span's context
    (:mod:`pgpubsub._tracing`). ``conn`` is any DB-API connection with
    ``cursor()`` (psycopg 3, psycopg2, Django's), so the messages join whatever
    transaction the caller is in.
    """
    with conn.cursor() as cur:
        cur.execute(STORE_SQL, [spec.name, trace, lines, spec.name])
        row = cur.fetchone()
    return list(row[0] or [])


async def astore(
    conn: psycopg.AsyncConnection[Any], spec: ChannelSpec, lines: str, trace: str | None = None
) -> list[int]:
    cur = await conn.execute(STORE_SQL, [spec.name, trace, lines, spec.name])
    row = await cur.fetchone()
    return list(row[0] or []) if row else []


# -- processing ---------------------------------------------------------------------


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
            ChannelProcessor(make(), spec, registry.listeners(spec), **opts) for spec in channels
        ]

    async def start(self) -> None:
        # Stored messages are always processed at start (what --recover asks for).
        for proc in self.processors:
            await self.engine.subscribe(proc.spec.name, self._waker(proc), thread=False)
            proc.start()
        self.engine.add_gap_handler(self._wake_all)

    def _wake_all(self, gap: Gap) -> None:
        for proc in self.processors:
            proc.wake.set()

    @staticmethod
    def _waker(proc: ChannelProcessor) -> Any:
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
    holds one transaction over the backlog. Raises NoListener, processing
    nothing, when a channel has no listener registered in this process.
    """
    reg = registry or default_registry
    specs = (
        [resolve_channel(c) for c in channels]
        if channels
        else [s for s in reg.channels() if s.lock]
    )
    # Completing a message that no listener ran would lose it: refuse, touching nothing.
    unheard = [s.path for s in specs if not reg.listeners(s)]
    if unheard:
        raise NoListener(
            f"no listener is registered in this process for {', '.join(unheard)}: import the "
            "module that defines its listeners first (no message was processed)"
        )
    session = default_session(dsn)
    try:
        return sum(
            ChannelProcessor(session, spec, reg.listeners(spec)).drain_once() for spec in specs
        )
    finally:
        session.close()
