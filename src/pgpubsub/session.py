"""The seam between durable processing and a database connection.

Claiming and completing messages needs four things: (re)connect, a
transaction that nests as savepoints, execute-and-fetch, and telling a lost
connection from a bug. :class:`~pgpubsub.durable.PsycopgSession` gives them on
a psycopg 3 connection of its own; :class:`~pgpubsub.djangodb.DjangoSession` on
Django's connection, so that ORM writes in a listener join the claim
transaction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

__all__ = ["Session"]


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
        """Run one statement; its rows, or [] when it returns none."""

    @abstractmethod
    def broken(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the connection is lost (reconnect) rather than a bug."""

    @abstractmethod
    def close(self) -> None: ...
