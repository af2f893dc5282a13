"""The seam around psycopg: every connection pgpubsub opens, and the hot read path.

Everything that talks to PostgreSQL goes through these few functions, so tests
and benchmarks can measure or swap them.

Notifications are read with psycopg's low-level ``PGconn`` API: one
``consume_input()`` per socket wake-up, then ``notifies()`` until empty. This
is several times faster than the ``Connection.notifies()`` generator and never
blocks. Notifications that arrive while psycopg runs a command on the same
connection are delivered by psycopg to the connection's notify handlers; the
callers register one that feeds the same buffer.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import namedtuple
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import (
    ConfigurationError,
    ConnectionFailed,
    ConnectionLost,
    DatabaseError,
    PermissionDenied,
    PgPubSubError,
    SchemaMissing,
)

__all__ = [
    "DEFAULT_APPLICATION_NAME",
    "AsyncConnection",
    "Connection",
    "Notify",
    "build_conninfo",
    "connect",
    "connect_async",
    "drain",
    "read_ready",
    "thread_connection",
    "translate",
    "keep_connected",
    "one_line",
    "sqlstate",
    "worth_waiting",
]

DEFAULT_APPLICATION_NAME = "pgpubsub"

#: TCP keepalives so that a half-open connection is noticed by the kernel too.
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}


class Notify(namedtuple("Notify", "pid channel payload", defaults=("",))):  # noqa: PYI024
    """One notification: the sender's backend ``pid``, the ``channel`` and the ``payload``.

    It behaves as psycopg2's ``Notify``: ``Notify(pid, channel, payload)``, shown
    as ``Notify(pid, 'channel', 'payload')``, and as a sequence it is the pair
    ``(pid, channel)`` (``n[0]`` is the pid, ``pid, channel = n``,
    ``n == (pid, channel)``); the payload is the attribute. Two notifications are
    equal when all three match.
    """

    __slots__ = ()

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: Any) -> Any:
        return tuple.__getitem__(self, slice(2))[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(tuple.__getitem__(self, slice(2)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Notify):
            return tuple.__eq__(self, other)
        if isinstance(other, tuple):
            return tuple.__getitem__(self, slice(2)) == other
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:  # psycopg2's: equal to (pid, channel)'s when there is no payload
        return tuple.__hash__(self) if self.payload else hash(tuple.__getitem__(self, slice(2)))

    def __repr__(self) -> str:
        return f"Notify({self.pid}, {self.channel!r}, {self.payload!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Notify, (self.pid, self.channel, self.payload))

    def _asdict(self) -> dict[str, Any]:
        return {"pid": self.pid, "channel": self.channel, "payload": self.payload}

    def _replace(self, **changes: Any) -> Notify:
        return Notify(**{**self._asdict(), **changes})

    @classmethod
    def of(cls, n: psycopg.Notify) -> Notify:
        return cls(n.pid, n.channel, n.payload)


class Connection(psycopg.Connection[Any]):
    """psycopg's Connection plus the psycopg2 spelling ``get_backend_pid()``."""

    def get_backend_pid(self) -> int:
        return self.info.backend_pid


class AsyncConnection(psycopg.AsyncConnection[Any]):
    """psycopg's AsyncConnection plus the psycopg2 spelling ``get_backend_pid()``."""

    def get_backend_pid(self) -> int:
        return self.info.backend_pid


def build_conninfo(conninfo: str = "", /, **kwargs: Any) -> str:
    """A libpq conninfo string from a conninfo/URI and psycopg2-style keywords.

    psycopg2's spellings are accepted: ``dsn=`` for the conninfo, ``database``
    as an alias of ``dbname``, and ``connection_factory``/``cursor_factory``
    when None (their default); keywords that are None are left out.
    When neither a conninfo nor keywords name a server, ``$PGPUBSUB_DSN`` is
    used if set, then the libpq environment variables (``PGHOST`` ...).
    ``application_name`` defaults to ``pgpubsub``.
    """
    dsn = kwargs.pop("dsn", None)
    if dsn is not None:
        if conninfo:
            raise ConfigurationError("give the connection string once: positionally or as dsn=")
        conninfo = dsn
    if "database" in kwargs:
        kwargs["dbname"] = kwargs.pop("database")
    for factory in ("connection_factory", "cursor_factory"):
        if kwargs.pop(factory, None) is not None:
            raise ConfigurationError(
                f"{factory} is a psycopg2 option pgpubsub does not take (it opens its own"
                " psycopg 3 connections); leave it out or pass None"
            )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not conninfo and not kwargs:
        conninfo = os.environ.get("PGPUBSUB_DSN", "")
    try:
        params = conninfo_to_dict(make_conninfo(conninfo, **kwargs))
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"invalid connection settings: {exc}") from exc
    params.setdefault("application_name", DEFAULT_APPLICATION_NAME)
    for key, value in _KEEPALIVES.items():
        params.setdefault(key, value)
    return make_conninfo(**params)  # type: ignore[arg-type]


# What a failed connection says when waiting cannot help: the server answered
# and refused these credentials or this database.
_PERMANENT = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "permission denied",
    "invalid connection option",
    "no password supplied",
)


def worth_waiting(exc: ConnectionFailed) -> bool:
    """Whether a failed connection may work later (server down or starting), not refused."""
    text = str(exc.__cause__ or exc).lower()
    return not any(reason in text for reason in _PERMANENT)


def one_line(exc: BaseException) -> str:
    """The first line of an error's text (driver errors add context lines and carets)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


#: SQLSTATEs of a missing or outdated pgpubsub schema: undefined table, column,
#: schema, function.
SCHEMA_STATES = frozenset({"42P01", "42703", "3F000", "42883"})
PRIVILEGE_STATE = "42501"


def sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of a driver error (psycopg 3 or psycopg2), or of the error that caused it."""
    while exc is not None:
        state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if state:
            return str(state)
        exc = exc.__cause__
    return None


def _failed(exc: psycopg.Error) -> PgPubSubError:
    if isinstance(exc, psycopg.ProgrammingError):
        return ConfigurationError(f"invalid connection settings: {exc}")
    return ConnectionFailed(f"cannot connect to PostgreSQL: {one_line(exc)}")


def connect(conninfo: str, *, autocommit: bool = True) -> Connection:
    """A sync connection; driver errors become ConnectionFailed (or ConfigurationError)."""
    try:
        return Connection.connect(conninfo, autocommit=autocommit)
    except psycopg.Error as exc:
        raise _failed(exc) from exc


def translate(exc: psycopg.Error, doing: str) -> PgPubSubError:
    """The pgpubsub error for a driver error met while ``doing`` something.

    The message says what to do: ``pgpubsub migrate`` when the schema is
    missing, the privilege the server refused when one is.
    """
    text = one_line(exc)
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return PermissionDenied(f"{doing}: {text} (see the privileges table in the README)")
    # Only pgpubsub's own statements come here: a missing column is a schema
    # older than the library; the other states must name pgpubsub.
    if exc.sqlstate == "42703" or (
        exc.sqlstate in SCHEMA_STATES and "pgpubsub" in f"{exc} {exc.diag.context or ''}"
    ):
        return SchemaMissing(
            f"{doing}: {text}: the pgpubsub schema is missing or outdated; run `pgpubsub migrate`"
        )
    # Lost connections only: a deadlock, a timeout or a full lock table is an
    # OperationalError too, and says so itself.
    if isinstance(exc, psycopg.OperationalError) and (
        exc.sqlstate is None or exc.sqlstate.startswith("08") or exc.sqlstate in _SHUTDOWN
    ):
        return ConnectionLost(f"{doing}: connection lost: {text}")
    return DatabaseError(f"{doing}: {text}")


# The server ended the session: terminated, shutting down, crashed.
_SHUTDOWN = {"57P01", "57P02", "57P03"}


_per_thread = threading.local()


def thread_connection(conninfo: str) -> Connection:
    """This thread's autocommit connection to ``conninfo``, connected again once closed."""
    conns: dict[str, Connection] = _per_thread.__dict__.setdefault("conns", {})
    conn = conns.get(conninfo)
    if conn is None or conn.closed:
        conn = conns[conninfo] = connect(conninfo)
    return conn


async def keep_connected(
    conninfo: str,
    body: Callable[[AsyncConnection], Awaitable[None]],
    trouble: Callable[[Exception, int], None],
    wait: float,
) -> None:
    """Run ``body`` on a connection, for ever (the loop of a background task).

    When connecting or ``body`` fails with a database error, ``trouble(error,
    failures)`` is called, and ``body`` runs again on a new connection after
    ``wait`` seconds. ``failures`` counts the failures in a row; a ``body`` that
    ran ``wait`` seconds or longer before it failed had been working, and starts
    the count again.
    """
    failures = 0
    while True:
        started = time.monotonic()
        try:
            conn = await connect_async(conninfo)
            async with conn:
                await body(conn)
        except (psycopg.Error, PgPubSubError) as exc:
            failures = 1 if time.monotonic() - started >= wait else failures + 1
            trouble(exc, failures)
        await asyncio.sleep(wait)


async def connect_async(conninfo: str, *, autocommit: bool = True) -> AsyncConnection:
    """An async connection; driver errors become ConnectionFailed (or ConfigurationError)."""
    try:
        return await AsyncConnection.connect(conninfo, autocommit=autocommit)
    except psycopg.Error as exc:
        raise _failed(exc) from exc


def read_ready(pgconn: pq.abc.PGconn) -> None:
    """Read what the socket has into libpq's buffers; raise ConnectionLost if it is gone."""
    try:
        pgconn.consume_input()
    except psycopg.OperationalError as exc:
        raise ConnectionLost(f"connection lost: {exc}") from exc
    if pgconn.status != pq.ConnStatus.OK:
        raise ConnectionLost("connection lost: the server closed the connection")


def drain(pgconn: pq.abc.PGconn, emit: Callable[[Notify], object]) -> int:
    """Pass every notification libpq has buffered to ``emit``; return how many."""
    notifies = pgconn.notifies
    count = 0
    n = notifies()
    while n is not None:
        emit(Notify(n.be_pid, n.relname.decode(), n.extra.decode()))
        count += 1
        n = notifies()
    return count
