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

    def pipeline(self) -> AbstractContextManager[Any]:
        """A block whose statements need not wait for their results (when the driver can)."""
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

    def open(self) -> None:
        if self.conn is None or self.conn.closed:
            self.conn = driver.connect(self.conninfo, autocommit=False)
            # Whatever the database's default_transaction_isolation: a batch
            # member's settlement must read its batch's latest counts
            # (schema: batch_member_settled), and a claim the latest rows.
            self.conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED

    @property
    def connection(self) -> Any:
        return self.conn

    def atomic(self) -> AbstractContextManager[Any]:
        assert self.conn is not None
        return self.conn.transaction()

    def execute(self, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
        assert self.conn is not None
        cur = self._run(query, params)
        return cur.fetchall() if cur.description else []

    def _run(self, query: str, params: Any) -> psycopg.Cursor[Any]:
        """The cursor of ``query`` run (a long one with named parameters: see _raw)."""
        assert self.conn is not None
        if len(query) > _LONG and isinstance(params, Mapping):
            raw, names = _raw(query)
            return psycopg.RawCursor(self.conn).execute(raw, [params[n] for n in names])
        return self.conn.execute(query, params)

    def fetch(
        self, query: str, params: Any = (), first: str | None = None
    ) -> list[tuple[Any, ...]]:
        conn = self.conn
        assert conn is not None
        if first is None or self._pipeline is not None or not psycopg.Pipeline.is_supported():
            if first is not None:
                conn.execute(first)
            return self._run(query, params).fetchall()
        with conn.pipeline():
            conn.execute(first)
            cur = self._run(query, params)
        # Read once the pipeline ended (its one Sync): the server's session is idle in
        # its transaction once both ran. Read inside the pipeline, they came with a
        # flush, and the session stayed active until this thread got to end the
        # pipeline (processors' threads take turns for the GIL: at concurrency=32, up
        # to 27 backends showed active); a sync before reading sent two Syncs.
        return cur.fetchall()

    @contextmanager
    def pipeline(self) -> Iterator[Any]:
        assert self.conn is not None
        if not psycopg.Pipeline.is_supported():
            yield None
            return
        with self.conn.pipeline() as pipeline:
            outer, self._pipeline = self._pipeline, pipeline
            try:
                yield pipeline
            finally:
                self._pipeline = outer

    def sync(self) -> None:
        if self._pipeline is not None:
            self._pipeline.sync()

    def in_transaction(self) -> bool:
        assert self.conn is not None
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
        if self.conn is not None:
            self.conn.close()
        self.conn = None
