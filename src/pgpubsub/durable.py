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
* A failure costs only its own message: a listener that raises (or whose
  write fails, deferrable constraints included: they are checked at each
  statement) rolls back only its message, and no listener runs again for
  another message's failure: the statements listeners send on
  :func:`connection` are written down, and when one message's are undone its
  neighbours' are sent again, not run again (:mod:`pgpubsub._journal`; a
  later message of an ordering key runs only once its key's earlier message
  is known to hold). The message is retried after
  an exponential delay with jitter (counted from the failure), up to the
  channel's ``max_attempts``; then it is kept as ``dead`` with the error and
  traceback, and can be replayed (:mod:`pgpubsub.messages`, ``pgpubsub
  messages``). A message whose worker dies in the handler is counted too:
  after such a death the batch's messages are claimed one at a time, so only
  the one that kills its worker ends dead. Only when a batch's COMMIT fails
  (a constraint a listener deferred itself) do its messages run again, each
  alone in a transaction of its own.
* Missed wake-ups (no worker running, a reconnect gap) are covered by polling:
  each worker looks for due messages every ``poll_interval`` seconds anyway.
* Job-queue options: ``notify(Channel(...), delay=, run_at=, priority=,
  dedupe_key=, ordering_key=, limit_key=)`` (:class:`Options`), and the channel
  options ``concurrency``, ``max_in_flight``, ``rate_limit``, ``key_rate_limit``,
  ``key_concurrency``, ``timeout`` and ``schedule``
  (:mod:`pgpubsub._schedule`); see the durable guide for each one's rules.
* Flow control: :func:`pgpubsub.messages.pause` / ``resume`` a channel across
  every worker; :func:`pgpubsub.messages.cancel` stops a running message
  (:func:`cancellation` inside a sync listener tells it to stop).

External side effects (an e-mail, an HTTP call) are at-least-once: a worker
can die after the side effect and before the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from . import _cancel, _integration, driver
from ._cancel import Cancellation
from ._crew import Crew
from ._due import due_channels
from ._leases import LeaseKeeper, new_owner
from ._processor import ChannelProcessor, current_connection
from .channel import ChannelSpec, resolve_channel
from .engine import Engine, Gap
from .errors import ConfigurationError, NoListener
from .listen import Registry
from .listen import registry as default_registry
from .messages import CANCEL_CHANNEL
from .session import PsycopgSession, Session

__all__ = [
    "Cancellation",
    "DurableRunner",
    "Options",
    "astore",
    "cancellation",
    "connection",
    "default_session",
    "migrate",
    "process_stored_notifications",
    "store",
]

# Payloads travel as one text of JSON lines (see notify.NOTIFY_MANY_SQL).
# ``trace``: the publisher's trace context (JSON, or NULL without OpenTelemetry).
# The plain path names only the columns of schema version 1, so publishers keep
# working between a library upgrade and `pgpubsub migrate`.
STORE_SQL = (
    "WITH ins AS (INSERT INTO pgpubsub.message (channel, payload) "
    "SELECT %s, x FROM pg_catalog.unnest(pg_catalog.string_to_array(%s, E'\\n')) AS x "
    "RETURNING id) "
    "SELECT pg_catalog.array_agg(id ORDER BY id), pgpubsub.wake(%s) FROM ins"
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


def cancellation() -> Cancellation:
    """The running attempt's :class:`~pgpubsub._cancel.Cancellation`, inside a durable listener.

    ``cancellation().requested`` turns true when the channel's ``timeout`` has
    passed or the message was cancelled (:func:`pgpubsub.messages.cancel`); a
    sync listener that can stop early checks it (or sleeps with
    ``cancellation().wait(seconds)``) and returns or raises; its writes are
    undone either way. An async listener is cancelled instead.
    """
    try:
        return _cancel.current.get()
    except LookupError:
        raise LookupError(
            "pgpubsub.durable.cancellation() is only set inside a durable listener"
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


# With publishing options: a due time, a priority, keys. A dedupe_key that is
# pending already stores nothing (the unique partial index decides, race-free;
# named by no conflict target: from schema version 6 it is an index of the
# partition pgpubsub.message_deduped, where every pending message with a
# dedupe_key is, and the parent table has none to name).
# Publishers of one ordering key take turns (a transaction-scoped advisory
# lock, taken before the ids are drawn): ids of a key follow the order in
# which their transactions commit, and the messages of a key run in id order.
# A delay counts from the call (clock_timestamp), not from the start of the
# publisher's transaction (now): delay=3 published 4 s into a transaction is
# due 3 s after that call.
STORE_OPTIONS_SQL = (
    "WITH ins AS (INSERT INTO pgpubsub.message "
    "(channel, payload, trace, run_at, priority, dedupe_key, ordering_key) "
    "SELECT %(channel)s, x, %(trace)s::jsonb, "
    "coalesce(%(run_at)s::timestamptz, pg_catalog.clock_timestamp()) "
    "+ pg_catalog.make_interval(secs => %(delay)s::float8), "
    "%(priority)s, %(dedupe_key)s, %(ordering_key)s "
    "FROM (SELECT CASE WHEN %(ordering_key)s::text IS NOT NULL THEN "
    "pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended("
    "%(channel)s || E'\\x1f' || %(ordering_key)s, 7)) END) AS key_lock(held), "
    "pg_catalog.unnest(pg_catalog.string_to_array(%(lines)s, E'\\n')) AS x "
    "ON CONFLICT DO NOTHING RETURNING id) "
    "SELECT pg_catalog.array_agg(id ORDER BY id), pgpubsub.wake(%(channel)s) FROM ins"
)
# With a limit_key (key_rate_limit, key_concurrency: schema version 6); only
# then is the column named, so other publishers work on an older schema.
STORE_LIMITED_SQL = STORE_OPTIONS_SQL.replace(
    "dedupe_key, ordering_key) ", "dedupe_key, ordering_key, limit_key) "
).replace("%(ordering_key)s FROM (SELECT", "%(ordering_key)s, %(limit_key)s FROM (SELECT")
# The wake-up is a NOTIFY only when a worker of the channel sleeps (schema
# version 5: pgpubsub.wake); on an older schema, until `pgpubsub migrate`, always.
_LEGACY = {
    STORE_SQL: STORE_SQL.replace("pgpubsub.wake(%s)", "pg_catalog.pg_notify(%s, '')"),
    **{
        query: query.replace("pgpubsub.wake(%(channel)s)", "pg_catalog.pg_notify(%(channel)s, '')")
        for query in (STORE_OPTIONS_SQL, STORE_LIMITED_SQL)
    },
}
WAKE_KNOWN_SQL = "SELECT pg_catalog.to_regprocedure('pgpubsub.wake(text)') IS NOT NULL"
# Connections known to have it (one query per connection; asked again until then).
_waking: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _known(conn: Any) -> bool:
    try:
        return conn in _waking
    except TypeError:  # neither hashable nor weakly referenced: ask each time
        return False


def _note(conn: Any) -> None:
    with contextlib.suppress(TypeError):
        _waking[conn] = True


def _sql(conn: Any, cur: Any, query: str) -> str:
    """``query`` as the schema in ``conn``'s database can run it (see _LEGACY)."""
    if _known(conn):
        return query
    cur.execute(WAKE_KNOWN_SQL)
    if not cur.fetchone()[0]:
        return _LEGACY[query]
    _note(conn)
    return query


async def _asql(conn: psycopg.AsyncConnection[Any], query: str) -> str:
    if _known(conn):
        return query
    row = await (await conn.execute(WAKE_KNOWN_SQL)).fetchone()
    if not (row and row[0]):
        return _LEGACY[query]
    _note(conn)
    return query


#: The longest delay (seconds): a century.
MAX_DELAY = 100 * 365.25 * 86400
#: The longest dedupe_key, ordering_key or limit_key (UTF-8 bytes).
MAX_KEY_BYTES = 1024
PENDING_KEY_SQL = (
    "SELECT id FROM pgpubsub.message WHERE channel = %s AND dedupe_key = %s AND status = 'pending'"
)


def _key(name: str, key: Any) -> str | None:
    """A checked dedupe_key, ordering_key or limit_key: indexed, so short, non-empty text."""
    if key is None:
        return None
    if not isinstance(key, str) or not key or "\x00" in key:
        raise ConfigurationError(f"{name} must be a non-empty str without NUL")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ConfigurationError(f"{name} is not valid Unicode text") from None
    if size > MAX_KEY_BYTES:  # a B-tree entry cannot hold much over 2 KB
        raise ConfigurationError(f"{name} is over {MAX_KEY_BYTES} bytes in UTF-8")
    return key


@dataclass(frozen=True)
class Options:
    """Publishing options of a durable message (``notify(Channel(...), delay=30, ...)``)."""

    run_at: datetime.datetime | None = None
    delay: float = 0.0
    priority: int = 0
    dedupe_key: str | None = None
    ordering_key: str | None = None
    #: The key of the channel's key_rate_limit and key_concurrency (None: not key-limited).
    limit_key: str | None = None

    @classmethod
    def of(cls, spec: ChannelSpec, options: dict[str, Any]) -> Options | None:
        """Checked options (None when none are given); an unknown or bad one raises."""
        if not options:
            return None
        unknown = set(options) - {
            "delay", "run_at", "priority", "dedupe_key", "ordering_key", "limit_key"
        }  # fmt: skip
        if unknown:
            raise ConfigurationError(
                f"unknown publishing option(s) {sorted(unknown)}: delay, run_at, priority,"
                " dedupe_key, ordering_key, limit_key"
            )
        if not spec.lock:
            raise ConfigurationError(
                f"{spec.path} is a plain channel: publishing options ({', '.join(options)}) "
                "need a durable channel (lock_notifications=True)"
            )
        delay = options.get("delay") or 0.0
        if isinstance(delay, datetime.timedelta):
            delay = delay.total_seconds()
        if (
            not isinstance(delay, (int, float))
            or isinstance(delay, bool)
            or not math.isfinite(delay)
            or not 0 <= delay <= MAX_DELAY
        ):
            raise ConfigurationError(
                f"delay must be seconds from 0 to {MAX_DELAY:g} (a century) or a timedelta,"
                f" not {delay!r}"
            )
        run_at = options.get("run_at")
        if run_at is not None:
            if not isinstance(run_at, datetime.datetime) or run_at.utcoffset() is None:
                raise ConfigurationError(f"run_at must be an aware datetime, not {run_at!r}")
            if delay:
                raise ConfigurationError("give delay or run_at, not both")
        priority = options.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ConfigurationError(f"priority must be an int, not {priority!r}")
        if not -(2**31) <= priority < 2**31:
            raise ConfigurationError(f"priority {priority} is out of range (32-bit)")
        keys = {
            name: _key(name, options.get(name))
            for name in ("dedupe_key", "ordering_key", "limit_key")
        }
        return cls(
            run_at,
            float(delay),
            priority,
            keys["dedupe_key"],
            keys["ordering_key"],
            keys["limit_key"],
        )

    @property
    def query(self) -> str:
        """The statement that stores messages with these options."""
        return STORE_OPTIONS_SQL if self.limit_key is None else STORE_LIMITED_SQL

    def params(self, spec: ChannelSpec, lines: str, trace: str | None) -> dict[str, Any]:
        return {
            "channel": spec.name,
            "trace": trace,
            "run_at": self.run_at,
            "delay": self.delay,
            "priority": self.priority,
            "dedupe_key": self.dedupe_key,
            "ordering_key": self.ordering_key,
            "limit_key": self.limit_key,
            "lines": lines,
        }


def store(
    conn: Any,
    spec: ChannelSpec,
    lines: str,
    trace: str | None = None,
    options: Options | None = None,
) -> list[int]:
    """Insert messages in ``conn``'s transaction and wake the workers; return their ids.

    ``lines``: the encoded messages, one JSON document per line
    (:meth:`ChannelSpec.encode_lines`); ``trace``: the publish span's context
    (:mod:`pgpubsub._tracing`). ``conn`` is any DB-API connection with
    ``cursor()`` (psycopg 3, psycopg2, Django's), so the messages join whatever
    transaction the caller is in. With a ``dedupe_key`` already pending, nothing
    is stored and the pending message's id is returned.
    """
    with conn.cursor() as cur:
        if options is None and trace is None:
            cur.execute(_sql(conn, cur, STORE_SQL), [spec.name, lines, spec.name])
            return list(cur.fetchone()[0] or [])
        options = options or Options()
        query = _sql(conn, cur, options.query)
        for _ in range(3):  # the pending duplicate may complete between the two statements
            cur.execute(query, options.params(spec, lines, trace))
            ids = list(cur.fetchone()[0] or [])
            if ids or options.dedupe_key is None:
                return ids
            cur.execute(PENDING_KEY_SQL, [spec.name, options.dedupe_key])
            ids = [r[0] for r in cur.fetchall()]
            if ids:
                return ids
    return []


async def astore(
    conn: psycopg.AsyncConnection[Any],
    spec: ChannelSpec,
    lines: str,
    trace: str | None = None,
    options: Options | None = None,
) -> list[int]:
    if options is None and trace is None:
        cur = await conn.execute(await _asql(conn, STORE_SQL), [spec.name, lines, spec.name])
        row = await cur.fetchone()
        return list(row[0] or []) if row else []
    options = options or Options()
    query = await _asql(conn, options.query)
    for _ in range(3):  # the pending duplicate may complete between the two statements
        cur = await conn.execute(query, options.params(spec, lines, trace))
        row = await cur.fetchone()
        ids = list(row[0] or []) if row else []
        if ids or options.dedupe_key is None:
            return ids
        cur = await conn.execute(PENDING_KEY_SQL, [spec.name, options.dedupe_key])
        ids = [r[0] for r in await cur.fetchall()]
        if ids:
            return ids
    return []


# -- processing ---------------------------------------------------------------------

CANCEL_REQUESTS_SQL = "SELECT id FROM pgpubsub.cancel_request WHERE id = ANY(%s)"


class DurableRunner:
    """The durable side of a worker: one processor per channel, woken by NOTIFY and a poll."""

    def __init__(
        self,
        engine: Engine,
        channels: list[ChannelSpec],
        registry: Registry,
        session_factory: Callable[[], Session] | None = None,
        worker_id: str | None = None,
        **opts: Any,
    ):
        self.engine = engine
        make = session_factory or (lambda: PsycopgSession(engine.conninfo))
        # ``concurrency`` processors per channel: each its own thread, session and
        # transactions, coordinating with every other worker through the claim.
        # Their leases are held in the name of this worker's registry row.
        owner = worker_id or new_owner()
        self.keeper = LeaseKeeper(engine.conninfo, owner)
        units = [spec for spec in channels for _ in range(spec.cls.concurrency)]
        self.processors = [
            ChannelProcessor(make(), spec, registry.listeners(spec), holder=f"{owner}#{n}", **opts)
            for n, spec in enumerate(units)
        ]
        # One crew per channel: a wake-up wakes one of its processors (see _crew).
        self.crews: dict[str, Crew] = {}
        for proc in self.processors:
            proc.crew = self.crews.setdefault(proc.spec.name, Crew())

    async def start(self) -> None:
        self.keeper.start()
        try:
            for name, crew in self.crews.items():
                await self.engine.subscribe(name, self._waker(crew), thread=False)
            await self.engine.subscribe(CANCEL_CHANNEL, self._cancel_requested, thread=False)
        except BaseException:
            await asyncio.to_thread(self.keeper.stop)  # nothing left running
            raise
        # Stored messages are always processed at start (what --recover asks for).
        for proc in self.processors:
            proc.start()
        self.engine.add_gap_handler(self._wake_all)

    def _wake_all(self, gap: Gap) -> None:
        for crew in self.crews.values():
            crew.wake_one()

    async def _cancel_requested(self, _msg: Any) -> None:
        """Messages were cancelled while workers handle them: stop those in this worker's hands.

        The NOTIFY says only "look" (anyone may send one): a listener stops only
        for a row of pgpubsub.cancel_request, which only an operator can write.
        """
        in_hand = {mid for proc in self.processors for mid in proc.in_hand}
        if in_hand:
            asked = set(await asyncio.to_thread(self._cancelled, list(in_hand)))
            # Its holder now: a batch cut meanwhile may have handed the message on
            # (review 21 of issue 26); for a moment both hold it, so both are asked.
            for proc in self.processors:
                for mid in asked.intersection(proc.in_hand):
                    proc.stop_running(mid)

    def _cancelled(self, ids: list[int]) -> list[int]:
        with driver.connect(self.engine.conninfo, autocommit=True) as conn:
            return [r[0] for r in conn.execute(CANCEL_REQUESTS_SQL, (ids,)).fetchall()]

    @staticmethod
    def _waker(crew: Crew) -> Any:
        def wake(_msg: Any) -> None:
            crew.wake_one()

        return wake

    async def stop(self, timeout: float, exiting: bool = False) -> None:
        """Stop the processors, waiting up to ``timeout`` for their batches in hand.

        ``exiting``: the process exits next, so a batch still in hand then is
        given back (:meth:`ChannelProcessor.stop`); in a process that goes on,
        its listener finishes it later and it commits as usual.
        """
        conninfo = self.engine.conninfo if exiting else None
        # One grace for all: joined in asyncio's default pool (a few threads), each
        # with the whole grace, 32 processors that outlast it took 6 graces to stop.
        deadline = time.monotonic() + timeout
        for p in self.processors:
            p.halt()

        def stop(p: ChannelProcessor) -> None:
            p.stop(max(0.0, deadline - time.monotonic()), conninfo)

        await asyncio.gather(*(asyncio.to_thread(stop, p) for p in self.processors))
        running = [p for p in self.processors if p.running]
        if running and not exiting:
            # Their listeners go on: the keys and slots they hold stay leased
            # (renewed) until they finish and give them back.
            threading.Thread(
                target=self._stop_keeper_after,
                args=(running,),
                name="pgpubsub-leases-after-stop",
                daemon=True,
            ).start()
            return
        await asyncio.to_thread(self.keeper.stop)

    def _stop_keeper_after(self, running: list[ChannelProcessor]) -> None:
        for proc in running:
            proc.join()
        self.keeper.stop()


def default_session(dsn: str = "") -> Session:
    """Django's connection when pgpubsub is an installed app and no dsn is given, else psycopg."""
    if not dsn and _integration.django_connection() is not None:
        from ._djangodb import DjangoSession

        return DjangoSession()
    return PsycopgSession(driver.build_conninfo(dsn))


def process_stored_notifications(
    channels: list[Any] | None = None, dsn: str = "", registry: Registry | None = None
) -> int:
    """Process every due stored message of durable channels now; return how many completed.

    ``channels``: channel classes or dotted paths (default: every registered
    durable channel). "Every due message" includes the later messages of an
    ordering key, which become due one by one as the one before completes: this
    goes round the channels until a query finds none of their messages due.
    Not due, so left for later: messages published with a delay, and failed
    ones waiting for their retry. Messages that other workers hold at that
    moment (claimed, or waiting for one of the ``max_in_flight`` slots they
    hold) are left to them. Each batch is its own short transaction, so this
    never holds one transaction over the backlog. Raises NoListener, processing
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
    owner = new_owner()
    processors = {
        s.name: ChannelProcessor(session, s, reg.listeners(s), holder=f"{owner}#{n}")
        for n, s in enumerate(specs)
    }
    keeper = LeaseKeeper(_conninfo(dsn), owner).start()
    completed = 0
    try:
        due = set(processors)
        while due:
            claimed = sum(p.claimed for p in processors.values())
            completed += sum(processors[name].drain_once() for name in sorted(due))
            if sum(p.claimed for p in processors.values()) == claimed:
                break  # due, yet nothing was ours to claim: other workers hold it
            due = due_channels(session, list(processors))
        return completed
    except psycopg.Error as exc:
        raise driver.translate(exc, "processing stored messages") from exc
    finally:
        keeper.stop()
        session.close()


def _conninfo(dsn: str) -> str:
    """The conninfo of what :func:`default_session` connects to."""
    if not dsn and _integration.django_connection() is not None:
        from ._djangodb import django_conninfo

        return django_conninfo()
    return driver.build_conninfo(dsn)
