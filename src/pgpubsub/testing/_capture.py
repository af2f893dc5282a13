"""What was published during a test: stored messages logged by a trigger, plain
ones received by a LISTEN opened when the test started, and, under Django, plain
ones seen in-process (a TestCase never commits, so nothing is ever delivered)."""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import psycopg
from psycopg import sql

from .. import _integration
from ..channel import Channel, spec_of
from ..notify import plain_observers

__all__ = ["CAPTURE_SQL", "Capture", "DjangoCapture", "django_capture", "plain_channels"]

# Installed in the template database of the pytest plugin: every stored
# message, as inserted (it is deleted once processed).
CAPTURE_SQL = """
CREATE SCHEMA pgpubsub_testing;
CREATE TABLE pgpubsub_testing.published (id bigint PRIMARY KEY, channel text, payload text);
CREATE FUNCTION pgpubsub_testing.capture() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
    INSERT INTO pgpubsub_testing.published (id, channel, payload)
    SELECT id, channel, payload FROM inserted WHERE status = 'pending';
    RETURN NULL;
END
$body$;
CREATE TRIGGER pgpubsub_testing_capture AFTER INSERT ON pgpubsub.message
REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT
EXECUTE FUNCTION pgpubsub_testing.capture();
"""


APPLICATION = "pgpubsub testing"  # application_name of its connections

#: Plain messages a Django test process remembers (the most recent).
KEEP = 10_000


def plain_channels() -> set[str]:
    """The names of every plain channel class defined so far (imported modules)."""
    found = set()
    classes = list(Channel.__subclasses__())
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        try:
            spec = spec_of(cls)
        except Exception:  # a base class that is no channel of its own
            continue
        if not spec.lock:
            found.add(spec.name)
    return found


@dataclass
class Capture:
    """The LISTEN of one test database: every plain channel known when the test started."""

    dsn: str
    conn: psycopg.Connection[Any]
    channels: set[str]
    received: list[tuple[str, str]] = field(default_factory=list)
    active: ClassVar[dict[str, Capture]] = {}

    @classmethod
    def open(cls, dsn: str) -> Capture:
        conn = psycopg.connect(dsn, autocommit=True, application_name=APPLICATION)
        channels = plain_channels()
        for name in sorted(channels):
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
        capture = cls(dsn, conn, channels)
        cls.active[dsn] = capture
        return capture

    def plain(self, channel: str) -> list[str]:
        if channel not in self.channels:
            raise LookupError(
                f"channel {channel!r} was not imported when the test started, so nothing "
                "listened to it: import its module in the test module or conftest.py"
            )
        while True:  # whatever the server has sent by now, then a short quiet moment
            got = list(self.conn.notifies(timeout=0.05))
            if not got:
                break
            self.received.extend((n.channel, n.payload) for n in got)
        return [payload for name, payload in self.received if name == channel]

    def close(self) -> None:
        self.active.pop(self.dsn, None)
        with contextlib.suppress(psycopg.Error):
            self.conn.close()


def _transaction() -> tuple[str, ...] | None:
    """Where Django's connection is (None: no Django): its open savepoints, as a
    TestCase runs each test in one."""
    conn = _integration.django_connection()
    if conn is None:
        return None
    return tuple(conn.savepoint_ids) if conn.in_atomic_block else ()


class DjangoCapture:
    """What Django tests published: plain messages (seen in this process) and the stored
    messages drain() processed (deleted since), each with the transaction it was in.

    A test sees what was recorded inside its own transaction: in a ``TestCase``, every
    test runs in a savepoint of its own, so a record made in that savepoint (or deeper)
    is the test's. :class:`~pgpubsub.testing.django.PubSubMixin` also forgets
    everything at the start of each test, for test cases without a transaction.
    """

    def __init__(self) -> None:
        self.plain: collections.deque[tuple[tuple[str, ...], str, str]] = collections.deque(
            maxlen=KEEP
        )
        self.drained: dict[int, tuple[tuple[str, ...], str, str]] = {}

    def _observe(self, channel: str, payloads: list[str]) -> None:
        where = _transaction()
        if where is None:  # only Django tests read these records
            return
        self.plain.extend((where, channel, p) for p in payloads)

    def remember(self, mid: int, channel: str, payload: str) -> None:
        self.drained[mid] = (_transaction() or (), channel, payload)

    def reset(self) -> None:
        self.plain.clear()
        self.drained.clear()

    def _visible(self, where: tuple[str, ...]) -> bool:
        now = _transaction() or ()
        return where[: len(now)] == now

    def plain_payloads(self, channel: str) -> list[str]:
        return [p for where, name, p in self.plain if name == channel and self._visible(where)]

    def drained_payloads(self, channel: str) -> dict[int, str]:
        return {
            mid: p
            for mid, (where, name, p) in self.drained.items()
            if name == channel and self._visible(where)
        }


#: Records from the moment pgpubsub.testing is imported (test modules import it).
django_capture = DjangoCapture()
plain_observers.append(django_capture._observe)
