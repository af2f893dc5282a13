"""``published`` and ``drain``: on a test database (a DSN), or on Django's connection."""

from __future__ import annotations

from typing import Any

import psycopg

from ..channel import ChannelSpec, TriggerChannel, resolve_channel
from ..listen import Registry
from ..listen import registry as default_registry
from ..processor import ChannelProcessor
from ..session import PsycopgSession, Session
from ..triggers import read_spill
from ._capture import APPLICATION, Capture, django_capture

__all__ = ["drain", "published"]

#: Rounds of retries before drain gives up on a message that neither completes
#: nor dies (only a channel whose max_attempts is huge gets there).
MAX_ROUNDS = 100
STORED_SQL = (
    "SELECT id, payload FROM pgpubsub.message WHERE channel = %s AND status <> 'spill' ORDER BY id"
)
CAPTURED_SQL = "SELECT payload FROM pgpubsub_testing.published WHERE channel = %s ORDER BY id"
SNAPSHOT_SQL = (
    "SELECT id, channel, payload FROM pgpubsub.message "
    "WHERE channel = ANY(%s) AND status = 'pending'"
)
# A failed message waits for its retry delay: in a test it is retried at once.
RETRY_NOW_SQL = (
    "UPDATE pgpubsub.message SET run_at = pg_catalog.now() WHERE channel = ANY(%s) "
    "AND status = 'pending' AND attempts > 0 AND last_error IS NOT NULL "
    "AND run_at > pg_catalog.now()"
)


def _session(dsn: str | None, using: str) -> Session:
    if dsn is not None:
        return PsycopgSession(dsn)
    from ..djangodb import DjangoSession

    return DjangoSession(using)


def published(channel: Any, dsn: str | None = None, *, using: str = "default") -> list[Any]:
    """The messages published on ``channel`` since the test started, decoded, oldest first.

    ``dsn``: the :func:`pgpubsub_dsn` of the test. Without it, Django's
    connection ``using``: inside a ``TestCase``, what the test published in its
    transaction (see :mod:`pgpubsub.testing.django`).
    """
    spec = resolve_channel(channel)
    return [spec.decode(p) for p in _payloads(spec, dsn, using)]


def _payloads(spec: ChannelSpec, dsn: str | None, using: str) -> list[str]:
    if dsn is None:
        return _django_payloads(spec, using)
    if not spec.lock:
        capture = Capture.active.get(dsn)
        if capture is None:
            raise LookupError(
                f"nothing listened on {dsn!r}: plain messages are seen on the "
                "pgpubsub_dsn fixture's database"
            )
        payloads = capture.plain(spec.name)
        if issubclass(spec.cls, TriggerChannel):  # a wide row travels as a reference
            resolved = (read_spill(dsn, p, spec.name) for p in payloads)
            return [p for p in resolved if p is not None]
        return payloads
    # The fixture's databases log every stored message (processed ones are deleted);
    # another database shows what is stored now.
    query = CAPTURED_SQL if dsn in Capture.active else STORED_SQL
    with psycopg.connect(dsn, autocommit=True, application_name=APPLICATION) as conn:
        return [r[-1] for r in conn.execute(query, (spec.name,))]


def _django_payloads(spec: ChannelSpec, using: str) -> list[str]:
    if not spec.lock:
        return django_capture.plain_payloads(spec.name)
    session = _session(None, using)
    with session.atomic():
        stored = {int(r[0]): r[1] for r in session.execute(STORED_SQL, (spec.name,))}
    for mid, payload in django_capture.drained_payloads(spec.name).items():
        stored.setdefault(mid, payload)
    return [stored[mid] for mid in sorted(stored)]


def drain(
    dsn: str | None = None,
    *,
    registry: Registry = default_registry,
    retry: bool = True,
    using: str = "default",
) -> int:
    """Run the registered listeners on every due stored message; return how many completed.

    As a worker does: in claim transactions, listeners' writes through
    :func:`pgpubsub.durable.connection` committed with their message, a
    failure recorded with its traceback and retried. With ``retry`` (the
    default) a failed message is retried at once, not after its delay, until
    it completes or is dead; without it, it stays pending for later.
    Messages published with a delay are not due, and stay.
    """
    specs = [s for s in registry.channels() if s.lock]
    names = [s.name for s in specs]
    session = _session(dsn, using)
    completed = 0
    try:
        session.open()
        for _ in range(MAX_ROUNDS):
            if dsn is None:  # processed rows are deleted: remember them
                with session.atomic():
                    for mid, name, payload in session.execute(SNAPSHOT_SQL, (names,)):
                        django_capture.remember(int(mid), name, payload)
            claimed = 0
            for spec in specs:
                processor = ChannelProcessor(session, spec, registry.listeners(spec))
                completed += processor.drain_once()
                claimed += processor.claimed
            if not retry or not claimed:
                break
            with session.atomic():
                session.execute(RETRY_NOW_SQL, (names,))
    finally:
        session.close()  # a Django session in the test's transaction stays open
    return completed
