"""``published`` and ``drain``: on a test database (a DSN), or on Django's connection."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from .._due import due_channels
from .._processor import ChannelProcessor
from ..channel import ChannelSpec, TriggerChannel, resolve_channel
from ..errors import PgPubSubError
from ..listen import Registry
from ..listen import registry as default_registry
from ..session import PsycopgSession, Session
from ..triggers import read_spill
from ._capture import APPLICATION, Capture, django_capture

__all__ = ["DrainIncomplete", "drain", "published"]

#: Rounds in a row in which no message completed or died before drain gives up
#: (a message retried this often without end has a max_attempts that is huge).
MAX_ROUNDS = 100
#: Seconds between rounds while what is due is held by another worker.
HELD_WAIT = 0.02
STORED_SQL = (
    "SELECT id, payload FROM pgpubsub.message WHERE channel = %s AND status <> 'spill' ORDER BY id"
)
CAPTURED_SQL = "SELECT payload FROM pgpubsub_testing.published WHERE channel = %s ORDER BY id"
SNAPSHOT_SQL = (
    "SELECT id, channel, payload FROM pgpubsub.message "
    "WHERE channel = ANY(%s) AND status = 'pending' AND id > %s"
)
# A failed message waits for its retry delay: in a test it is retried at once.
RETRY_NOW_SQL = (
    "UPDATE pgpubsub.message SET run_at = pg_catalog.now() WHERE channel = ANY(%s) "
    "AND status = 'pending' AND attempts > 0 AND last_error IS NOT NULL "
    "AND run_at > pg_catalog.now()"
)


# What is left when drain gives up: the due messages, and the failing ones among them.
LEFT_SQL = (
    "SELECT pg_catalog.count(*) FROM pgpubsub.message WHERE channel = ANY(%s) "
    "AND status = 'pending' AND run_at <= pg_catalog.now()"
)
FAILING_SQL = (
    "SELECT id, channel, attempts, last_error, ordering_key FROM pgpubsub.message "
    "WHERE channel = ANY(%s) AND status = 'pending' AND run_at <= pg_catalog.now() "
    "AND last_error IS NOT NULL ORDER BY id LIMIT 5"
)


class DrainIncomplete(PgPubSubError, RuntimeError):
    """:func:`drain` could not run every due message: the message says how many are left, why."""


def _session(dsn: str | None, using: str) -> Session:
    if dsn is not None:
        return PsycopgSession(dsn)
    from .._djangodb import DjangoSession

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
    Messages published with a delay are not due, and stay. The later messages
    of an ordering key run too, each after the one before: drain goes on until
    nothing is due.

    Raises :class:`DrainIncomplete`, saying how many messages are left and
    why, when it cannot finish: after ``MAX_ROUNDS`` rounds in a row in which
    no message completed or died (a message that keeps failing on a channel
    with a huge ``max_attempts``, or due messages that another worker holds).
    """
    specs = {s.name: s for s in registry.channels() if s.lock}
    names = list(specs)
    session = _session(dsn, using)
    completed = 0
    try:
        session.open()
        processors = {
            name: ChannelProcessor(session, spec, registry.listeners(spec))
            for name, spec in specs.items()
        }
        due, idle, seen = set(names), 0, 0
        while due:
            if dsn is None:  # processed rows are deleted: remember them
                with session.atomic():
                    for mid, name, payload in session.execute(SNAPSHOT_SQL, (names, seen)):
                        django_capture.remember(int(mid), name, payload)
                        seen = max(seen, int(mid))
            before = _progress(processors)
            for name in sorted(due):
                completed += processors[name].drain_once()
            if retry:
                with session.atomic():
                    session.execute(RETRY_NOW_SQL, (names,))
            due = due_channels(session, names)
            after = _progress(processors)
            idle = 0 if after[:2] != before[:2] else idle + 1
            if due and idle >= MAX_ROUNDS:
                raise DrainIncomplete(_left(session, specs, held=after[2] == before[2]))
            if due and after[2] == before[2]:
                time.sleep(HELD_WAIT)  # what is due is another worker's for now
    finally:
        session.close()  # a Django session in the test's transaction stays open
    return completed


def _progress(processors: dict[str, ChannelProcessor]) -> tuple[int, int, int]:
    """Messages completed, messages dead, claims: a round that changes neither of the
    first two brought no message closer to its end."""
    ps = processors.values()
    return (
        sum(p.processed for p in ps),
        sum(p.dead for p in ps),
        sum(p.claimed for p in ps),
    )


def _left(session: Session, specs: dict[str, ChannelSpec], *, held: bool) -> str:
    """Why drain gives up: how many messages are left due, and what holds them."""
    names = list(specs)
    with session.atomic():
        left = int(session.execute(LEFT_SQL, (names,))[0][0])
        failing = session.execute(FAILING_SQL, (names,))
    text = (
        f"drain gave up after {MAX_ROUNDS} rounds in which no message completed or died: "
        f"{left} message(s) still due"
    )
    reasons = []
    for mid, name, attempts, error, key in failing:
        last = (str(error).strip().splitlines() or [""])[-1]
        behind = f", holding back ordering key {key!r}" if key is not None else ""
        reasons.append(
            f"message {mid} on {name} failed {attempts} times "
            f"(max_attempts {specs[name].cls.max_attempts}){behind}: {last}"
        )
    if reasons:
        text += "; " + "; ".join(reasons)
        text += " (fix the listener, lower max_attempts, or drain(retry=False) to leave failures)"
    elif held:
        text += ": another worker holds them (claimed, or all max_in_flight slots taken)"
    return text
