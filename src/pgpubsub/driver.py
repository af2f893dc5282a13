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

from .errors import ConnectionLost

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
    if not conninfo and not kwargs:
        conninfo = os.environ.get("PGPUBSUB_DSN", "")
    params = conninfo_to_dict(make_conninfo(conninfo, **kwargs))
    params.setdefault("application_name", DEFAULT_APPLICATION_NAME)
    for key, value in _KEEPALIVES.items():
        params.setdefault(key, value)
    return make_conninfo(**params)  # type: ignore[arg-type]


def connect(conninfo: str, *, autocommit: bool = True) -> Connection:
    """A sync connection; driver errors become ConnectionLost."""
    try:
        return Connection.connect(conninfo, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise ConnectionLost(f"cannot connect: {exc}") from exc


_per_thread = threading.local()


def thread_connection(conninfo: str) -> Connection:
    """This thread's autocommit connection to ``conninfo``, connected again once closed."""
    conns: dict[str, Connection] = _per_thread.__dict__.setdefault("conns", {})
    conn = conns.get(conninfo)
    if conn is None or conn.closed:
        conn = conns[conninfo] = connect(conninfo)
    return conn


async def connect_async(conninfo: str, *, autocommit: bool = True) -> AsyncConnection:
    """An async connection; driver errors become ConnectionLost."""
    try:
        return await AsyncConnection.connect(conninfo, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise ConnectionLost(f"cannot connect: {exc}") from exc


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
