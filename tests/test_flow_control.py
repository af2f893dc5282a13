"""Flow control on durable channels (issue 28): timeouts, cancelling running work, pause
and resume, rate limits.

A listener past its channel's ``timeout`` is stopped (async: cancelled; sync: told through
``durable.cancellation()``) and its attempt fails as a timeout, its writes undone; a message
cancelled while it runs ends cancelled, its writes undone, never run again.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import DurableRunning, admin_query, wait_until

import pgpubsub
from pgpubsub import durable, messages
from pgpubsub._processor import ChannelProcessor
from pgpubsub.channel import Channel, Rate, rate_of, spec_of
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


# -- pause and resume; rate limits (several `pgpubsub listen --worker` processes) ------------

TESTS = Path(__file__).parent


class Worker:
    """``pgpubsub listen app.flow_listeners --worker`` as a subprocess: one machine's worker."""

    def __init__(self, dsn: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgpubsub", "listen", "app.flow_listeners", "--worker"],
            env={**os.environ, "PGPUBSUB_DSN": dsn, "PYTHONPATH": python_path()},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out = self.proc.communicate(timeout=30)[0]
        assert self.proc.returncode == 0, out
        return out


def python_path() -> str:
    """The tests' folder (for ``app``), then this process's PYTHONPATH."""
    return os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)


@contextlib.contextmanager
def workers(dsn: str, n: int) -> Iterator[list[Worker]]:
    """``n`` worker processes, each registered (running) before the block starts."""
    before = live_workers(dsn)
    running = [Worker(dsn) for _ in range(n)]
    try:
        wait_until(lambda: live_workers(dsn) >= before + n, timeout=30, interval=0.05)
        yield running
    finally:
        for w in running:
            if w.proc.poll() is None:
                w.stop()


def live_workers(dsn: str) -> int:
    return int(str(admin_query(dsn, "SELECT count(*) FROM pgpubsub.worker")[0][0]))


@pytest.fixture
def flow(dsn: str) -> Iterator[str]:
    durable.migrate(dsn)
    admin_query(
        dsn,
        "CREATE TABLE started (channel text, n int, pid int, at timestamptz, claimed timestamptz)",
    )
    yield dsn


def publish_flow(dsn: str, channel: Any, ns: range) -> None:
    with psycopg.connect(dsn) as conn:
        pgpubsub.notify_many(channel, [{"n": n} for n in ns], conn=conn)


def starts(dsn: str, channel: str, at: str = "at") -> list[tuple[int, int, datetime.datetime]]:
    """(n, pid, when) of each committed start on ``channel``, in start order (``at="claimed"``:
    when each was claimed, in claim order)."""
    found = admin_query(
        dsn, f"SELECT n, pid, {at} FROM started WHERE channel = %s ORDER BY {at}", (channel,)
    )
    return [(int(str(r[0])), int(str(r[1])), r[2]) for r in found]  # type: ignore[misc]


def db_now(dsn: str) -> datetime.datetime:
    return admin_query(dsn, "SELECT clock_timestamp()")[0][0]  # type: ignore[return-value]


# A paused worker is asleep: it looks again at its poll (1 s) at the latest. Nothing can
# signal "a start that did not happen", so a paused channel is watched for longer than that.
WATCH = 1.5


@pytest.mark.acceptance  # worker processes
def test_a_paused_channel_starts_nothing_on_any_worker_until_resumed(flow: str) -> None:
    from app.flow_channels import Pausable

    with workers(flow, 3) as running:
        publish_flow(flow, Pausable, range(10))
        wait_until(lambda: len(starts(flow, "pausable")) == 10, timeout=20)
        cli = subprocess.run(
            [sys.executable, "-m", "pgpubsub", "messages", "pause", "--channel", "flow.pausable"],
            env={**os.environ, "PGPUBSUB_DSN": flow},
            capture_output=True,
            text=True,
        )
        assert cli.returncode == 0, cli.stderr
        assert "paused flow.pausable" in cli.stdout
        paused_at = db_now(flow)
        publish_flow(flow, Pausable, range(10, 40))  # wake-ups go out: the workers look
        # A pause holds across a worker's restart: one stops, a new one starts.
        running[0].stop()
        with workers(flow, 1):
            time.sleep(WATCH)
            health = pgpubsub.status(flow)
            (counts,) = [c for c in health.channels if c.channel == "flow.pausable"]
            assert counts.paused and counts.pending == 30
            assert health.problems(max_age=0.1) == []  # waiting on a pause is no problem
            assert len(starts(flow, "pausable")) == 10
            resumed_at = db_now(flow)  # before the resume commits: none started by then
            with psycopg.connect(flow) as conn:
                assert messages.resume(conn, Pausable) is True
            wait_until(lambda: len(starts(flow, "pausable")) == 40, timeout=20)
    done = starts(flow, "pausable")
    assert sorted(n for n, _, _ in done) == list(range(40))  # nothing lost, none twice
    assert not [n for n, _, at in done if paused_at <= at <= resumed_at]
    assert not [n for n, _, at in done if n >= 10 and at < resumed_at]
    assert admin_query(flow, "SELECT count(*) FROM pgpubsub.message")[0][0] == 0


def test_pause_and_resume_say_whether_the_state_changed_and_resume_wakes_workers(
    flow: str,
) -> None:
    with (
        psycopg.connect(flow, autocommit=True) as conn,
        psycopg.connect(flow, autocommit=True) as worker,
    ):
        worker.execute('LISTEN "orders"')
        assert messages.pause(conn, "orders") is True
        assert messages.pause(conn, "orders") is False
        assert list(messages.paused(conn)) == ["orders"]
        assert [c.channel for c in pgpubsub.status(flow).channels if c.paused] == ["orders"]
        assert not list(worker.notifies(timeout=0.1, stop_after=1))
        assert messages.resume(conn, "orders") is True
        (woken,) = worker.notifies(timeout=5, stop_after=1)
        assert woken.channel == "orders"
        assert messages.resume(conn, "orders") is False
        assert messages.paused(conn) == {}
        with pytest.raises(ConfigurationError, match="need a channel"):
            messages.pause(conn, "")


def test_a_worker_of_a_paused_channel_sleeps_until_its_poll(flow: str) -> None:
    from app.flow_channels import Pausable

    publish_flow(flow, Pausable, range(3))
    with psycopg.connect(flow, autocommit=True) as conn:
        messages.pause(conn, Pausable)
    spec = spec_of(Pausable)
    proc = ChannelProcessor(PsycopgSession(flow), spec, [], poll_interval=1.0)
    try:
        assert proc.drain_once() == 0
        assert proc.claimed == 0
        # a message due soon does not wake it either: nothing may start before resume
        admin_query(flow, "UPDATE pgpubsub.message SET run_at = now() + interval '50 ms'")
        assert proc._next_due() == 1.0
    finally:
        proc.session.close()


def test_a_pause_after_a_claim_lets_that_batch_finish(flow: str) -> None:
    """The first listener of a batch pauses the channel: the batch's others still run; what
    is published afterwards waits for resume."""
    from app.flow_channels import Pausable

    admin_query(flow, "CREATE TABLE effects (n int)")
    registry = Registry()

    def listener(n: int) -> None:
        if n == 0:
            with psycopg.connect(flow, autocommit=True) as conn:
                assert messages.pause(conn, Pausable)
        write(n)

    registry.add(Pausable, listener)
    spec = spec_of(Pausable)
    publish_flow(flow, Pausable, range(5))
    proc = ChannelProcessor(PsycopgSession(flow), spec, registry.listeners(spec))
    try:
        assert proc.drain_once() == 5
        assert effects(flow) == [0, 1, 2, 3, 4]
        publish_flow(flow, Pausable, range(5, 7))
        assert proc.drain_once() == 0
        with psycopg.connect(flow, autocommit=True) as conn:
            assert messages.resume(conn, Pausable)
        assert proc.drain_once() == 2
    finally:
        proc.session.close()


@pytest.mark.acceptance  # worker processes
def test_a_rate_limited_channel_never_exceeds_its_rate_across_processes_and_achieves_it(
    flow: str,
) -> None:
    """Paced: 50/s, a bucket of 5. Over any window of one second, at most 50 + 5 messages
    claimed (the bucket's capacity), and the limit is reached: 200 messages take
    (200 - 5) / 50 s. A listener starts a few ms after its claim: the starts get a margin."""
    from app.flow_channels import Paced

    rate = rate_of(Paced)
    assert rate is not None and (rate.count, rate.period, rate.capacity) == (50, 1.0, 5)
    with workers(flow, 3):
        publish_flow(flow, Paced, range(200))
        wait_until(lambda: len(starts(flow, "paced")) == 200, timeout=30, interval=0.1)
    done = starts(flow, "paced", at="claimed")
    assert sorted(n for n, _, _ in done) == list(range(200))
    assert len({pid for _, pid, _ in done}) >= 2  # the limit is shared, not per worker
    claimed = [at.timestamp() for _, _, at in done]
    assert most_in_a_window(claimed, 1.0) <= 50 + 5
    achieved = (len(claimed) - 5) / (claimed[-1] - claimed[0])
    assert 50 * 0.95 <= achieved <= 50 * 1.001, achieved
    started = sorted(at.timestamp() for _, _, at in starts(flow, "paced"))
    assert most_in_a_window(started, 1.0) <= 50 + 5 + 2


def most_in_a_window(times: list[float], period: float) -> int:
    """The most of ``times`` (sorted) in any window of ``period`` seconds."""
    return max(bisect.bisect_right(times, t + period) - i for i, t in enumerate(times))


@pytest.mark.acceptance  # worker processes
def test_a_rate_limits_bucket_outlives_its_workers(flow: str) -> None:
    """Slow: 5 a minute, a bucket of 1. The first message starts at once; the next token is
    12 s away, whichever worker asks, however often the workers restart."""
    from app.flow_channels import Slow

    publish_flow(flow, Slow, range(3))
    with workers(flow, 2):
        wait_until(lambda: len(starts(flow, "slow")) == 1, timeout=20)
    with workers(flow, 2):
        time.sleep(WATCH)
    assert len(starts(flow, "slow")) == 1
    (tokens,) = admin_query(
        flow, "SELECT tokens FROM pgpubsub.rate_bucket WHERE channel = %s", ("flow.slow",)
    )[0]
    assert 0 <= float(str(tokens)) < 1


def test_a_worker_out_of_tokens_sleeps_until_the_next_one(flow: str) -> None:
    @dataclass
    class TwoASecond(Channel, lock_notifications=True, rate_limit="2/s"):
        n: int

    publish_flow(flow, TwoASecond, range(3))
    spec = spec_of(TwoASecond)
    proc = ChannelProcessor(PsycopgSession(flow), spec, [], poll_interval=5.0)
    try:
        proc.drain_once()
        assert proc.claimed == 1  # a bucket of 1
        wait = proc._next_due()
        assert 0.3 < wait <= 0.5, wait  # the next token, not a poll, not at once
    finally:
        proc.session.close()


@pytest.mark.parametrize(
    "value",
    ["100", "0/s", "-1/s", "1/week", "x/s", 100, (0, timedelta(seconds=1)),
     (5, timedelta(0)), (5, 1.0), (True, timedelta(seconds=1)), "2000000/s",
     (5, timedelta(days=2))],
)  # fmt: skip
def test_a_bad_rate_limit_is_refused_at_declaration(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="rate_limit must be None, 'N/unit'"):

        @dataclass
        class Bad(Channel, lock_notifications=True, rate_limit=value):
            n: int


@pytest.mark.parametrize(
    ("value", "count", "period", "capacity"),
    [("100/s", 100, 1.0, 10), ("10/m", 10, 60.0, 1), ("7 / hour", 7, 3600.0, 1),
     ((1000, timedelta(minutes=1)), 1000, 60.0, 100)],
)  # fmt: skip
def test_a_rate_limit_is_read_as_said(value: Any, count: int, period: float, capacity: int) -> None:
    @dataclass
    class Good(Channel, lock_notifications=True, rate_limit=value):
        n: int

    assert rate_of(Good) == Rate(count, period)
    assert Rate(count, period).capacity == capacity


def test_a_rate_limit_needs_a_durable_channel() -> None:
    @dataclass
    class Plain(Channel, rate_limit="5/s"):
        n: int

    with pytest.raises(ConfigurationError, match="rate_limit need lock_notifications=True"):
        spec_of(Plain)


def test_the_dashboard_pauses_and_resumes_a_channel_as_an_allowed_action(flow: str) -> None:
    from app.flow_channels import Pausable
    from test_dashboard import dashboard, request

    publish_flow(flow, Pausable, range(2))
    page = "/channel?name=flow.pausable"
    with dashboard(flow) as url:
        status, text = request(url + page)
        assert status == 200 and "Pause the channel" not in text  # read-only: no button
        assert request(f"{url}/actions/pause", b"channel=flow.pausable")[0] == 403
    with dashboard(flow, "--allow-actions") as url:
        status, text = request(url + page)
        assert status == 200 and "Pause the channel" in text
        found = re.search(r'name="csrf" value="([^"]+)"', text)
        assert found is not None
        token = found.group(1)
        forged = request(f"{url}/actions/pause", b"channel=flow.pausable&csrf=forged")
        assert forged[0] == 403
        assert admin_query(flow, "SELECT channel FROM pgpubsub.channel_pause") == []
        body = f"channel=flow.pausable&csrf={token}".encode()
        status, text = request(f"{url}/actions/pause", body)
        assert status == 200 and "Resume the channel" in text and ">paused<" in text
        assert admin_query(flow, "SELECT channel FROM pgpubsub.channel_pause") == [
            ("flow.pausable",)
        ]
        assert "kind paused" in request(url + "/")[1]  # the overview says so too
        status, text = request(f"{url}/actions/resume", body)
        assert status == 200 and "Pause the channel" in text
        assert admin_query(flow, "SELECT channel FROM pgpubsub.channel_pause") == []
