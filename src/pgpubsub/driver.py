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

import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

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


class Notify(NamedTuple):
    """One notification: ``channel``, ``payload`` and the sender's backend ``pid``.

    Shown as psycopg2 showed it, ``Notify(pid, 'channel', 'payload')``.
    """

    channel: str
    payload: str
    pid: int

    def __repr__(self) -> str:
        return f"Notify({self.pid}, {self.channel!r}, {self.payload!r})"

    @classmethod
    def of(cls, n: psycopg.Notify) -> Notify:
        return cls(n.channel, n.payload, n.pid)


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

    ``database`` is accepted as an alias of ``dbname`` (psycopg2 accepts both).
    When neither a conninfo nor keywords name a server, ``$PGPUBSUB_DSN`` is
    used if set, then the libpq environment variables (``PGHOST`` ...).
    ``application_name`` defaults to ``pgpubsub``.
    """
    if "database" in kwargs:
        kwargs["dbname"] = kwargs.pop("database")
    if kwargs.get("connection_factory") is None:  # psycopg2's default, meaning "the usual"
        kwargs.pop("connection_factory", None)
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


def _failed(exc: psycopg.Error) -> PgPubSubError:
    if isinstance(exc, psycopg.ProgrammingError):
        return ConfigurationError(f"invalid connection settings: {exc}")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConnectionFailed(f"cannot connect to PostgreSQL: {text}")


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
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return PermissionDenied(f"{doing}: {text} (see the privileges table in the README)")
    if isinstance(
        exc,
        (
            psycopg.errors.UndefinedTable,
            psycopg.errors.InvalidSchemaName,
            psycopg.errors.UndefinedFunction,
        ),
    ) and "pgpubsub" in str(exc):
        return SchemaMissing(
            f"{doing}: {text}: the pgpubsub schema is missing or outdated; run `pgpubsub migrate`"
        )
    if isinstance(exc, psycopg.OperationalError):
        return ConnectionLost(f"{doing}: connection lost: {text}")
    return DatabaseError(f"{doing}: {text}")


_per_thread = threading.local()


def thread_connection(conninfo: str) -> Connection:
    """This thread's autocommit connection to ``conninfo``, connected again once closed."""
    conns: dict[str, Connection] = _per_thread.__dict__.setdefault("conns", {})
    conn = conns.get(conninfo)
    if conn is None or conn.closed:
        conn = conns[conninfo] = connect(conninfo)
    return conn


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
        emit(Notify(n.relname.decode(), n.extra.decode(), n.be_pid))
        count += 1
        n = notifies()
    return count
