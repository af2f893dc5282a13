"""Flow control on durable channels (issue 28): timeouts and cancelling running work.

A listener past its channel's ``timeout`` is stopped (async: cancelled; sync: told through
``durable.cancellation()``) and its attempt fails as a timeout, its writes undone; a message
cancelled while it runs ends cancelled, its writes undone, never run again.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from helpers import DurableRunning, admin_query

import pgpubsub
from pgpubsub import durable, messages
from pgpubsub._processor import ChannelProcessor
from pgpubsub.channel import Channel, spec_of
from pgpubsub.errors import ConfigurationError
from pgpubsub.listen import Registry
from pgpubsub.session import PsycopgSession


@dataclass
class Timed(Channel, lock_notifications=True, timeout=0.3, max_attempts=2, retry_delay=30):
    n: int


@dataclass
class Stoppable(Channel, lock_notifications=True):
    n: int


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    durable.migrate(dsn)
    admin_query(dsn, "CREATE TABLE effects (n int)")
    yield dsn


def publish(dsn: str, channel: Any, ns: range) -> list[int]:
    """Publish; the ids of the messages stored."""
    with psycopg.connect(dsn) as conn:
        pgpubsub.notify_many(channel, [{"n": n} for n in ns], conn=conn)
    found = admin_query(
        dsn,
        "SELECT id FROM pgpubsub.message WHERE (payload::json->>'n')::int = ANY(%s) ORDER BY id",
        (list(ns),),
    )
    return [r[0] for r in found]


def write(n: int) -> None:
    durable.connection().execute("INSERT INTO effects VALUES (%s)", (n,))


def effects(dsn: str) -> list[int]:
    return sorted(r[0] for r in admin_query(dsn, "SELECT n FROM effects"))  # type: ignore[misc]


def stored(dsn: str) -> dict[int, tuple[Any, ...]]:
    """n -> (status, attempts, last error's last line) of every stored message."""
    found = admin_query(
        dsn, "SELECT (payload::json->>'n')::int, status, attempts, last_error FROM pgpubsub.message"
    )
    return {r[0]: (r[1], r[2], (r[3] or "").strip().splitlines()[-1:]) for r in found}  # type: ignore[misc]


def drain(dsn: str, registry: Registry, channel: Any) -> float:
    spec = spec_of(channel)
    proc = ChannelProcessor(PsycopgSession(dsn), spec, registry.listeners(spec))
    started = time.monotonic()
    proc.drain_once()
    proc.session.close()
    return time.monotonic() - started


# -- timeouts ---------------------------------------------------------------------------------


def test_an_async_listener_past_its_timeout_is_cancelled_and_its_attempt_fails(db: str) -> None:
    registry = Registry()

    async def slow(n: int) -> None:
        write(n)
        if n == 1:
            await asyncio.sleep(30)

    registry.add(Timed, slow)
    publish(db, Timed, range(3))
    assert drain(db, registry, Timed) < 5  # not 30
    assert effects(db) == [0, 2]  # message 1's write undone
    status, attempts, error = stored(db)[1]
    assert (status, attempts) == ("pending", 1)
    assert "AttemptTimeout" in error[0] and "timeout=0.3" in error[0]


@pytest.mark.parametrize("listens", [True, False])
def test_a_sync_listener_past_its_timeout_is_told_and_its_attempt_fails(
    db: str, listens: bool
) -> None:
    """A sync listener cannot be interrupted: one that checks its cancellation stops early;
    one that does not runs to its end. Either way the attempt fails as a timeout and its
    writes are undone; the batch's other messages complete."""
    registry = Registry()
    told: list[bool] = []

    def slow(n: int) -> None:
        write(n)
        if n == 1:
            if listens:
                told.append(durable.cancellation().wait(30))
            else:
                time.sleep(0.6)

    registry.add(Timed, slow)
    publish(db, Timed, range(3))
    took = drain(db, registry, Timed)
    assert took < 5
    assert told == ([True] if listens else [])
    assert effects(db) == [0, 2]
    assert set(stored(db)) == {1}
    assert "AttemptTimeout" in stored(db)[1][2][0]


def test_a_listener_that_always_times_out_ends_dead(db: str) -> None:
    admin_query(db, "UPDATE pgpubsub.message SET status = status")  # nothing: a clean table
    registry = Registry()
    registry.add(Timed, lambda n: time.sleep(0.5))
    publish(db, Timed, range(1))
    drain(db, registry, Timed)
    admin_query(db, "UPDATE pgpubsub.message SET run_at = now()")  # the retry, due now
    drain(db, registry, Timed)
    status, attempts, error = stored(db)[0]
    assert (status, attempts) == ("dead", 2)
    assert "AttemptTimeout" in error[0]


@pytest.mark.parametrize("value", [0, -1, "1", math.nan, math.inf, True, 86401])
def test_a_bad_timeout_is_refused_at_declaration(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):

        @dataclass
        class Bad(Channel, lock_notifications=True, timeout=value):
            n: int


def test_a_timeout_needs_a_durable_channel() -> None:
    @dataclass
    class Plain(Channel, timeout=5):
        n: int

    with pytest.raises(ConfigurationError, match="timeout need lock_notifications=True"):
        spec_of(Plain)


# -- cancelling running work --------------------------------------------------------------------


def test_cancelling_a_running_message_stops_it_and_undoes_its_writes(db: str) -> None:
    registry = Registry()
    started, finished = threading.Event(), threading.Event()
    stopped: list[bool] = []

    def listener(n: int) -> None:
        write(n)
        if n == 0:
            started.set()
            stopped.append(durable.cancellation().wait(30))
            finished.set()

    registry.add(Stoppable, listener)
    runner = DurableRunning(db, [Stoppable], registry)
    try:
        (running,) = publish(db, Stoppable, range(1))
        assert started.wait(10)
        (waiting,) = publish(db, Stoppable, range(1, 2))  # pending behind it (concurrency 1)
        with psycopg.connect(db) as conn:
            result = messages.cancel(conn, [running, waiting])
        assert finished.wait(5)
        deadline = time.monotonic() + 5
        while stored(db) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        runner.stop()
    assert (int(result), result.stopping) == (1, (running,))
    assert stopped == [True]
    assert stored(db) == {}  # both cancelled: gone, neither runs again
    assert effects(db) == []  # the running one's write undone


def test_a_forged_cancel_notification_stops_nothing(db: str) -> None:
    """Any role can send a NOTIFY: only a cancel request an operator stored stops a listener."""
    registry = Registry()
    started, release = threading.Event(), threading.Event()
    stopped: list[bool] = []

    def listener(n: int) -> None:
        write(n)
        started.set()
        stopped.append(durable.cancellation().wait(1.0) or release.wait(0))

    registry.add(Stoppable, listener)
    runner = DurableRunning(db, [Stoppable], registry)
    try:
        publish(db, Stoppable, range(1))
        assert started.wait(10)
        admin_query(db, "SELECT pg_notify('pgpubsub.cancel', '')")
        deadline = time.monotonic() + 5
        while stored(db) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        runner.stop()
    assert stopped == [False]
    assert effects(db) == [0]
