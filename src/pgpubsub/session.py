"""The seam between durable processing and a database connection.

Claiming and completing messages needs: (re)connect, a transaction that
nests as savepoints, execute-and-fetch, telling a lost connection from a bug,
and optionally a pipeline (statements sent without waiting for each result).
:class:`PsycopgSession` gives them on a psycopg 3 connection
of its own; :class:`~pgpubsub._djangodb.DjangoSession` on
Django's connection, so that ORM writes in a listener join the claim
transaction.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import psycopg

from . import driver
from .errors import DatabaseConnectionError

__all__ = ["PsycopgSession", "Session"]


class Session(ABC):
    @abstractmethod
    def open(self) -> None:
        """Connect if not connected (or connected no more)."""

    @property
    @abstractmethod
    def connection(self) -> Any:
        """The connection listeners get from :func:`pgpubsub.durable.connection`."""

    @abstractmethod
    def atomic(self) -> AbstractContextManager[Any]:
        """A transaction, or a savepoint when one is open."""

    @abstractmethod
    def execute(self, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """Run one statement; its rows, or [] when it returns none (or in a pipeline)."""

    def fetch(
        self, query: str, params: Any = (), first: str | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement that returns rows and wait for them, in a pipeline too.

        ``first``: a statement without parameters run just before it (in the
        same round trip when the driver can).
        """
        if first is not None:
            self.execute(first)
        return self.execute(query, params)

    def together(self, statements: list[tuple[str, Any]]) -> list[list[tuple[Any, ...]]]:
        """Run ``statements`` (query, parameters) in a transaction of their own (a savepoint
        when one is open); each one's rows. In one round trip when the driver can."""
        with self.atomic():
            return [self.execute(query, params) for query, params in statements]

    def pipeline(self) -> AbstractContextManager[Any]:
        """A block whose statements need not wait for their results (when the driver can).

        An :meth:`atomic` block inside it queues its COMMIT with them."""
        return nullcontext()

    def sync(self) -> None:  # noqa: B027 - nothing to wait for without a pipeline
        """Wait for every statement sent so far: an error of theirs raises here, not later."""

    def in_transaction(self) -> bool:
        """Whether a transaction is open already (then :meth:`atomic` is a savepoint)."""
        return False

    @abstractmethod
    def broken(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the connection is lost (reconnect) rather than a bug."""

    @abstractmethod
    def close(self) -> None: ...


# psycopg converts a query's placeholders anew at every execution when the query is
# longer than 4,096 characters (it caches shorter ones): the claims are 7.5 to 9.5
# KB, and their conversion took about 150 us of the worker's CPU per claim (a sixth
# of an empty claim). Such a query with named parameters is converted once here, to
# PostgreSQL's $n, and run through a RawCursor, which sends it as it is.
_LONG = 4096
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%|%s")
_RAW: dict[str, tuple[str, tuple[str, ...]]] = {}


def _raw(query: str) -> tuple[str, tuple[str, ...]]:
    """``query`` with $n for its %(name)s placeholders, and the names in $n's order."""
    made = _RAW.get(query)
    if made is None:
        names: list[str] = []

        def number(m: re.Match[str]) -> str:
            if m.group(0) == "%%":
                return "%"
            if m.group(1) is None:
                raise ValueError("a long query with positional placeholders")
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"${names.index(m.group(1)) + 1}"

        made = _RAW[query] = (_PLACEHOLDER.sub(number, query), tuple(names))
    return made


class PsycopgSession(Session):
    """The claim session on a psycopg 3 connection of its own."""

    def __init__(self, conninfo: str):
        self.conninfo = conninfo
        self.conn: psycopg.Connection[Any] | None = None
        self._pipeline: psycopg.Pipeline | None = None
        # The transaction of the outermost atomic() block until its first statement,
        # whose round trip sends its BEGIN (see atomic); and while the block lasts.
        self._unbegun: psycopg.Transaction | None = None
        self._block: psycopg.Transaction | None = None
        # Whether a statement alone runs read committed (the server's default).
        self._alone_committed = False

    def open(self) -> None:
        if self.conn is None or self.conn.closed:
            # Autocommit: a transaction is an atomic() block (no BEGIN that psycopg
            # sends and waits for by itself: see there), or one statement alone
            # (together()).
            self.conn = driver.connect(self.conninfo, autocommit=True)
            # Whatever the database's default_transaction_isolation: a batch
            # member's settlement must read its batch's latest counts
            # (schema: batch_member_settled), and a claim the latest rows.
            self.conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            # Read, not set: a SET would not hold behind a pooler in transaction mode.
            level = self.conn.execute("SHOW default_transaction_isolation").fetchone()
            self._alone_committed = level is not None and level[0] == "read committed"

    @property
    def connection(self) -> Any:
        self._begin()  # what is run on it belongs to the atomic() block it is in
        return self.conn

    @contextmanager
    def atomic(self) -> Iterator[Any]:
        """A transaction whose BEGIN goes with its first statement, in one round trip.

        psycopg sends a transaction's BEGIN, and waits for it, before the first
        statement: a round trip of each claim, look and batch, each costing the
        worker about 0.1 ms of CPU and a wait on a busy server (a message costs
        several transactions). The outermost block's BEGIN is queued with its first
        statement in a pipeline instead; a block that runs none sends neither BEGIN
        nor COMMIT. Inside :meth:`pipeline`, its COMMIT is queued too, and sent
        with the pipeline's Sync. A savepoint is psycopg's.
        """
        conn = self.conn
        assert conn is not None
        if self.in_transaction() or not psycopg.Pipeline.is_supported():
            self._begin()
            with conn.transaction() as tx:
                yield tx
            return
        tx = self._unbegun = self._block = psycopg.Transaction(conn)
        try:
            yield tx
        except BaseException as exc:
            if self._unbegun is tx:  # nothing sent: nothing to undo
                self._unbegun = None
            elif not tx.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            if self._unbegun is tx:
                self._unbegun = None
            else:
                tx.__exit__(None, None, None)
        finally:
            self._block = None

    def _begin(self) -> None:
        """Send (or, in a pipeline, queue) the BEGIN of the atomic() block that ran nothing yet."""
        if self._unbegun is None:
            return
        assert self.conn is not None
        if self._pipeline is not None:
            self._begin_queued()
            return
        with self.conn.pipeline():
            self._begin_queued()

    def _begin_queued(self) -> None:
        """Queue the pending BEGIN in the pipeline open (it runs with what follows)."""
        tx, self._unbegun = self._unbegun, None
        if tx is not None:
            tx.__enter__()

    def execute(self, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
        assert self.conn is not None
        if self._unbegun is not None and self._pipeline is None:
            with self.conn.pipeline():
                self._begin_queued()
                cur = self._run(query, params)
        else:
            cur = self._run(query, params)
        return cur.fetchall() if cur.description else []

    def _run(self, query: str, params: Any) -> psycopg.Cursor[Any]:
        """The cursor of ``query`` run (a long one with named parameters: see _raw)."""
        assert self.conn is not None
        self._begin()
        if len(query) > _LONG and isinstance(params, Mapping):
            raw, names = _raw(query)
            return psycopg.RawCursor(self.conn).execute(raw, [params[n] for n in names])
        return self.conn.execute(query, params)

    def fetch(
        self, query: str, params: Any = (), first: str | None = None
    ) -> list[tuple[Any, ...]]:
        conn = self.conn
        assert conn is not None
        if self._pipeline is not None:
            if first is not None:
                self._begin()
                conn.execute(first)
            cur = self._run(query, params)
            # With a Sync, not a flush: the server's session is then idle in its
            # transaction, not active, while the listeners that follow run.
            self._pipeline.sync()
            return cur.fetchall()
        if first is None and self._unbegun is None or not psycopg.Pipeline.is_supported():
            if first is not None:
                self._begin()
                conn.execute(first)
            return self._run(query, params).fetchall()
        with conn.pipeline():
            self._begin_queued()
            if first is not None:
                conn.execute(first)
            cur = self._run(query, params)
        # Read once the pipeline ended (its one Sync): the server's session is idle in
        # its transaction once both ran. Read inside the pipeline, they came with a
        # flush, and the session stayed active until this thread got to end the
        # pipeline (processors' threads take turns for the GIL: at concurrency=32, up
        # to 27 backends showed active); a sync before reading sent two Syncs.
        return cur.fetchall()

    def together(self, statements: list[tuple[str, Any]]) -> list[list[tuple[Any, ...]]]:
        if self.in_transaction() or not psycopg.Pipeline.is_supported():
            return super().together(statements)
        if len(statements) == 1 and self._alone_committed:  # a transaction as it is
            return [self.execute(*statements[0])]
        with self.pipeline(), self.atomic():
            cursors = [self._run(query, params) for query, params in statements]
        return [cur.fetchall() if cur.description else [] for cur in cursors]

    @contextmanager
    def pipeline(self) -> Iterator[Any]:
        conn = self.conn
        assert conn is not None
        if not psycopg.Pipeline.is_supported():
            yield None
            return
        outer = self._pipeline
        try:
            with conn.pipeline() as pipeline:
                self._pipeline = pipeline
                try:
                    self._begin_queued()
                    yield pipeline
                finally:
                    self._pipeline = outer
        except BaseException:
            # A statement queued before an atomic() block's COMMIT failed: the COMMIT
            # was skipped, and the transaction, aborted, is no open block's to undo.
            if self._block is None and not conn.closed:
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                    conn.rollback()
            raise

    def sync(self) -> None:
        if self._pipeline is not None:
            self._pipeline.sync()

    def in_transaction(self) -> bool:
        assert self.conn is not None
        if self._unbegun is not None:
            return True
        return self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def broken(self, exc: BaseException) -> bool:
        # The connection's state decides, not the error's class: a listener's
        # statement timeout, deadlock or failed connect elsewhere is an
        # OperationalError too, and only fails its message.
        if isinstance(exc, DatabaseConnectionError):
            return True
        return isinstance(exc, psycopg.OperationalError) and (
            self.conn is None or self.conn.closed
        )

    def close(self) -> None:
        self._unbegun = self._block = None
        if self.conn is not None:
            self.conn.close()
        self.conn = None
