"""What was published during a test: stored messages logged by a trigger, plain
ones received by a LISTEN opened when the test started, and, under Django, plain
ones seen in-process (a TestCase never commits, so nothing is ever delivered)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import psycopg
from psycopg import sql

from ..channel import Channel, spec_of
from ..notify import plain_observers

__all__ = ["CAPTURE_SQL", "Capture", "DjangoCapture", "plain_channels"]

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
        conn = psycopg.connect(dsn, autocommit=True)
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


class DjangoCapture:
    """In-process record of a Django test: plain publishes, and stored messages drained."""

    current: ClassVar[DjangoCapture | None] = None

    def __init__(self) -> None:
        self.plain: list[tuple[str, str]] = []
        self.drained: dict[int, tuple[str, str]] = {}  # id -> (channel, payload)

    def _observe(self, channel: str, payloads: list[str]) -> None:
        self.plain.extend((channel, p) for p in payloads)

    def start(self) -> None:
        DjangoCapture.current = self
        plain_observers.append(self._observe)

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            plain_observers.remove(self._observe)
        if DjangoCapture.current is self:
            DjangoCapture.current = None
