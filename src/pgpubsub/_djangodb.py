"""pgpubsub on Django's database: the claim session and the listening conninfo.

Durable listeners under Django run inside a claim transaction on Django's own
connection (``transaction.atomic``), so ORM writes in a listener commit if and
only if its message completes - whichever driver Django uses (psycopg 3 or
psycopg2). The listening connection is pgpubsub's own psycopg 3 connection to
the same database, built from Django's connection parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg import pq
from psycopg.conninfo import make_conninfo

from .session import Session

__all__ = ["DjangoSession", "django_conninfo"]

READ_COMMITTED_SQL = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED"


class DjangoSession(Session):
    """The claim session on Django's connection ``alias`` (one per thread, as Django does)."""

    def __init__(self, alias: str = "default"):
        self.alias = alias

    @property
    def connection(self) -> Any:
        from django.db import connections

        return connections[self.alias]

    def open(self) -> None:
        conn = self.connection
        if not conn.in_atomic_block:  # in a transaction (a TestCase's) it is in use: keep it
            conn.close_if_unusable_or_obsolete()
        conn.ensure_connection()

    @contextmanager
    def atomic(self) -> Iterator[Any]:
        """Django's atomic block; a transaction of its own begins READ COMMITTED.

        Whatever the database's default_transaction_isolation (Django sets the
        level only when OPTIONS name one): a claim must see the rows other
        workers committed, and settling a batch member its batch's latest
        counts (schema: batch_member_settled), never fail or miss them.
        """
        from django.db import transaction

        outermost = not self.connection.in_atomic_block
        with transaction.atomic(using=self.alias) as block:
            if outermost:
                with self.connection.cursor() as cur:
                    cur.execute(READ_COMMITTED_SQL)
            yield block

    def execute(self, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cur:
            cur.execute(query, params)
            return list(cur.fetchall()) if cur.description else []

    def in_transaction(self) -> bool:
        return bool(self.connection.in_atomic_block)

    def broken(self, exc: BaseException) -> bool:
        from django.db import InterfaceError, OperationalError

        if isinstance(exc, InterfaceError):
            return True
        # As for psycopg: the connection's state decides, not the error's class.
        raw = self.connection.connection
        return isinstance(exc, OperationalError) and (raw is None or bool(raw.closed))

    def close(self) -> None:
        conn = self.connection
        if not conn.in_atomic_block:  # in a transaction (a TestCase's) it is the caller's
            conn.close()


def django_conninfo(alias: str = "default") -> str:
    """A libpq conninfo for the database of Django's connection ``alias``."""
    from django.db import connections

    params = connections[alias].get_connection_params()
    known = {d.keyword.decode() for d in pq.Conninfo.get_defaults()}
    return make_conninfo(
        "", **{k: v for k, v in params.items() if k in known and isinstance(v, str | int)}
    )
