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
import itertools
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import DurableRunning, admin_query, record_calls, wait_until

import pgpubsub
from pgpubsub import _claim_sql, _flow_sql, _processor, durable, messages
from pgpubsub._processor import ChannelProcessor
from pgpubsub.channel import Channel, Rate, rate_of, spec_of
from pgpubsub.errors import ConfigurationError
from pgpubsub.listen import Registry
from pgpubsub.session import PsycopgSession, Session


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
        "CREATE TABLE started (channel text, n int, pid int, at timestamptz, claimed timestamptz,"
        " key text, ended timestamptz)",
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
    (200 - 5) / 50 s. A claim's instant here is its UPDATE, up to the claim's duration
    after it took its tokens (in one run the first claim's UPDATE came 24 ms after the
    bucket's refill began, and the claims on fresh tokens after it fell into its window;
    on a loaded machine, 57 claims in a window, twice: two more than the bucket allows,
    40 ms of such lag at 50/s): the claims get a margin of three (60 ms of lag; a limit
    per worker instead of shared would be 150), and a listener, which starts a few ms after its
    claim (tens of ms beside other tests), of four."""
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
    assert most_in_a_window(claimed, 1.0) <= 50 + 5 + 3
    # The rate is the slope of the claims' instants (least squares) from the first
    # message claimed on a token the bucket refilled (the 6th): each instant is its
    # claim's UPDATE, a while after the claim took its tokens, and that while varies
    # (a worker's first claim is planned cold), so the first and last alone said
    # more of two claims' durations than of the bucket.
    # Above the rate only by that while's jitter: over these 4 s, 4 ms of it is x1.001 (a
    # run beside other tests gave 50.05, three CI runs on a slower day 50.55-50.63: the
    # lag shrinking by some 40 ms over the run); a limit per worker instead of shared would
    # be x3.
    achieved = 1 / statistics.linear_regression(range(len(claimed) - 5), claimed[5:]).slope
    assert 50 * 0.95 <= achieved <= 50 * 1.02, achieved
    # A listener starts after its claim's COMMIT and its processing's BEGIN: beside the
    # other test process on 2 cores, some of those starts came late enough to share a
    # window with later ones (58 once, with concurrency=1, where no claims wait on each
    # other): a margin of four (80 ms of such lag at 50/s).
    started = sorted(at.timestamp() for _, _, at in starts(flow, "paced"))
    assert most_in_a_window(started, 1.0) <= 50 + 5 + 4


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


# -- flow control per key: key_rate_limit, key_concurrency, limit_key (issue 28) --------------


def publish_keyed(dsn: str, channel: Any, ns: range, key: str | None, **fields: Any) -> None:
    with psycopg.connect(dsn) as conn:
        options = {} if key is None else {"limit_key": key}
        pgpubsub.notify_many(channel, [{"n": n, **fields} for n in ns], conn=conn, **options)


def most_at_once(runs: list[tuple[float, float]]) -> int:
    """The most of the ``(start, end)`` intervals that overlap at any instant."""
    edges = sorted([(s, 1) for s, _ in runs] + [(e, -1) for _, e in runs])  # ends first on ties
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@pytest.mark.acceptance  # worker processes
def test_a_key_rate_limit_holds_per_key_across_processes_and_holds_back_no_other_key(
    flow: str,
) -> None:
    """PerKey: 5/s per limit_key, a bucket of 1. Three keys of 12 messages and 20 without
    a key, on 3 workers: per key at most 5 + 1 claimed in any second and 5/s reached; the
    keys run side by side (not one after another) and the unkeyed ones at once."""
    from app.flow_channels import PerKey

    with workers(flow, 3):
        published = db_now(flow)
        for key in ("a", "b", "c"):
            publish_keyed(flow, PerKey, range(ord(key) * 100, ord(key) * 100 + 12), key)
        publish_keyed(flow, PerKey, range(20), None)
        wait_until(lambda: len(starts(flow, "per_key")) == 56, timeout=30, interval=0.1)
    rows = admin_query(flow, "SELECT n, key, claimed, at FROM started WHERE channel = 'per_key'")
    assert sorted(int(str(r[0])) for r in rows) == sorted(
        [*range(20), *(n for k in "abc" for n in range(ord(k) * 100, ord(k) * 100 + 12))]
    )  # nothing lost, none twice
    unkeyed = [r[3] for r in rows if r[1] is None]
    assert max(unkeyed) - published < timedelta(seconds=1.5)  # not behind the keyed ones
    for key in "abc":
        claimed = sorted(r[2].timestamp() for r in rows if r[1] == key)  # type: ignore[union-attr]
        assert len(claimed) == 12
        assert most_in_a_window(claimed, 1.0) <= 5 + 1, key
        achieved = (len(claimed) - 1) / (claimed[-1] - claimed[0])
        # A bucket of 1 banks nothing: a worker's lateness (a loaded machine) is lost
        # time; a worker polling for tokens would reach 1/s.
        assert 5 * 0.8 <= achieved <= 5 * 1.001, (key, achieved)
    # side by side: the three keys' 36 messages take about as long as one key's 12
    ends = max(r[2] for r in rows if r[1] is not None)
    assert ends - published < timedelta(seconds=4)  # one after another: over 6.6 s


@pytest.mark.acceptance  # worker processes
def test_key_concurrency_holds_per_key_across_processes_and_holds_back_no_other_key(
    flow: str,
) -> None:
    """Crowded: key_concurrency=2, 4 processors in each of 2 workers, listeners of 0.15 s.
    Per limit_key never more than 2 in listeners at once; across keys more than 2 run."""
    from app.flow_channels import Crowded

    with workers(flow, 2):
        publish_keyed(flow, Crowded, range(0, 8), "x")
        publish_keyed(flow, Crowded, range(100, 108), "y")
        publish_keyed(flow, Crowded, range(200, 206), None)
        wait_until(
            lambda: (
                admin_query(
                    flow,
                    "SELECT count(*) FROM started WHERE channel = 'crowded' AND ended IS NOT NULL",
                )[0][0]
                == 22
            ),
            timeout=30,
            interval=0.1,
        )
        leases = admin_query(flow, "SELECT count(*) FROM pgpubsub.lease WHERE kind = 'limit'")
    rows = admin_query(flow, "SELECT n, key, at, ended FROM started WHERE channel = 'crowded'")
    assert sorted(int(str(r[0])) for r in rows) == [*range(8), *range(100, 108), *range(200, 206)]
    runs: dict[Any, list[tuple[float, float]]] = {}
    for _, key, at, ended in rows:
        runs.setdefault(key, []).append((at.timestamp(), ended.timestamp()))  # type: ignore[union-attr]
    assert most_at_once(runs["x"]) <= 2 and most_at_once(runs["y"]) <= 2
    assert most_at_once([r for rs in runs.values() for r in rs]) >= 3
    assert most_at_once(runs["x"]) == 2  # the limit is reached, not 1 at a time
    assert leases[0][0] == 0  # every slot given back


@dataclass
class TwoPerKey(Channel, lock_notifications=True, key_rate_limit="2/s"):
    n: int


@dataclass
class RarePerKey(Channel, lock_notifications=True, key_rate_limit="1/m"):
    n: int


def processor(dsn: str, channel: Any, registry: Registry | None = None, **opts: Any) -> Any:
    spec = spec_of(channel)
    listeners = [] if registry is None else registry.listeners(spec)
    return ChannelProcessor(PsycopgSession(dsn), spec, listeners, **opts)


def test_a_worker_whose_due_messages_are_of_exhausted_keys_sleeps_until_the_next_token(
    flow: str,
) -> None:
    publish_keyed(flow, TwoPerKey, range(3), "a")
    proc = processor(flow, TwoPerKey, poll_interval=5.0)
    try:
        proc.drain_once()
        assert proc.claimed == 1  # a bucket of 1
        wait = proc._next_due()
        assert 0.3 < wait <= 0.5, wait  # the key's next token, not a poll, not at once
        assert proc.drain_once() == 0  # and not before it
    finally:
        proc.session.close()


def test_an_exhausted_key_holds_back_only_its_own_messages(flow: str) -> None:
    """1/m per key: of 50 messages of key a (published first), 5 of key b and 3 without a
    key, one drain runs a's first, b's first and the 3: no head-of-line blocking."""
    registry = Registry()
    ran: list[int] = []
    registry.add(RarePerKey, lambda n: ran.append(n))
    publish_keyed(flow, RarePerKey, range(50), "a")
    publish_keyed(flow, RarePerKey, range(100, 105), "b")
    publish_keyed(flow, RarePerKey, range(200, 203), None)
    proc = processor(flow, RarePerKey, registry)
    try:
        proc.drain_once()
        assert sorted(ran) == [0, 100, 200, 201, 202]
        assert proc.drain_once() == 0  # both keys out of tokens for a minute
        attempts = admin_query(flow, "SELECT DISTINCT attempts FROM pgpubsub.message")
        assert attempts == [(0,)]  # the ones given back are uncharged
    finally:
        proc.session.close()
    assert sorted(ran) == [0, 100, 200, 201, 202]


def test_an_ordering_key_given_back_with_its_message_is_not_left_leased(flow: str) -> None:
    """Review of issue 28, finding 1: a message of an ordering key whose limit key's token
    went to an earlier message goes back, and the lease the claim took on its ordering key
    goes with it. It stayed held (renewed for as long as the worker lived), and no worker
    ran that ordering key's messages again."""
    registry = Registry()
    ran: list[int] = []
    registry.add(RarePerKey, lambda n: ran.append(n))
    with psycopg.connect(flow) as conn:
        pgpubsub.notify(RarePerKey(n=0), conn=conn, limit_key="k")
        pgpubsub.notify(RarePerKey(n=1), conn=conn, limit_key="k", ordering_key="o")
    proc = processor(flow, RarePerKey, registry)
    try:
        proc.drain_once()
        assert ran == [0]
        assert admin_query(flow, "SELECT name FROM pgpubsub.lease WHERE kind = 'key'") == []
    finally:
        proc.session.close()


def test_a_limit_key_over_1024_bytes_is_refused_whoever_stores_it(flow: str) -> None:
    """Review of issue 28, finding 4: a publisher's INSERT of a 2,672-byte limit_key (past
    notify()'s check) named a key_concurrency lease too wide for its index, and every claim
    of the channel failed from then on."""
    with pytest.raises(psycopg.errors.CheckViolation):
        admin_query(
            flow,
            "INSERT INTO pgpubsub.message (channel, payload, limit_key) "
            "VALUES ('c', '{}', repeat('x', 1025))",
        )
    admin_query(
        flow,
        "INSERT INTO pgpubsub.message (channel, payload, limit_key) "
        "VALUES ('c', '{}', repeat('x', 1024))",
    )


def test_a_busy_worker_keeps_the_key_buckets_bounded(
    flow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 28, finding 3: full buckets of idle keys were deleted only when a
    worker rested, so one that never rested kept a row per key it had ever claimed."""

    monkeypatch.setattr(_processor, "BUCKET_SWEEP_EVERY", 0.0)  # each batch: deterministic

    @dataclass
    class Distinct(Channel, lock_notifications=True, key_rate_limit="1000/s"):
        n: int

    with psycopg.connect(flow) as conn:
        for n in range(2000):
            pgpubsub.notify(Distinct(n=n), conn=conn, limit_key=f"k{n}")
    registry = Registry()
    registry.add(Distinct, lambda n: time.sleep(0.0005))
    proc = processor(flow, Distinct, registry)
    try:
        assert proc.drain_once() == 2000  # one drain: it never rests
    finally:
        proc.session.close()
    (rows,) = admin_query(flow, "SELECT count(*) FROM pgpubsub.key_bucket")[0]
    assert rows < 1000, rows  # the keys of about the last 0.1 s (a full bucket), not 2000


def test_ordering_keys_keep_their_order_through_limit_keys(flow: str) -> None:
    """One ordering key whose messages alternate limit keys a, b, a, b (1/m each): the
    first two run; the third waits for a's token and the fourth waits behind it."""
    registry = Registry()
    ran: list[int] = []
    registry.add(RarePerKey, lambda n: ran.append(n))
    with psycopg.connect(flow) as conn:
        for n, key in enumerate("abab"):
            pgpubsub.notify(RarePerKey(n=n), conn=conn, ordering_key="o", limit_key=key)
    proc = processor(flow, RarePerKey, registry)
    try:
        proc.drain_once()
        proc.drain_once()
    finally:
        proc.session.close()
    assert ran == [0, 1]
    left = admin_query(flow, "SELECT limit_key, attempts FROM pgpubsub.message ORDER BY id")
    assert left == [("a", 0), ("b", 0)]


def test_the_buckets_of_idle_keys_are_deleted(flow: str) -> None:
    @dataclass
    class Fast(Channel, lock_notifications=True, key_rate_limit="1000/s"):
        n: int

    for k in range(20):
        publish_keyed(flow, Fast, range(k, k + 1), f"k{k}")
    proc = processor(flow, Fast)
    try:
        proc.drain_once()
        assert proc.claimed == 20
        assert admin_query(flow, "SELECT count(*) FROM pgpubsub.key_bucket")[0][0] == 20
        # Refilled to their capacity (100 ms at most): a rest deletes them (a sweep a second).
        wait_until(
            lambda: (
                proc._next_due() > 0
                and admin_query(flow, "SELECT count(*) FROM pgpubsub.key_bucket")[0][0] == 0
            ),
            timeout=5,
            interval=0.02,
        )
    finally:
        proc.session.close()


def test_a_key_concurrency_slot_is_held_while_its_listener_runs(flow: str) -> None:
    """key_concurrency=1 (in-process): while a's listener runs, another processor starts
    b's message but none of a's; a's slot is given back when its listener returns."""

    @dataclass
    class OnePerKey(Channel, lock_notifications=True, key_concurrency=1):
        n: int

    registry = Registry()
    inside, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def listener(n: int) -> None:
        ran.append(n)
        if n == 0:
            inside.set()
            assert release.wait(10)

    registry.add(OnePerKey, listener)
    publish_keyed(flow, OnePerKey, range(0, 1), "a")
    first = processor(flow, OnePerKey, registry)
    second = processor(flow, OnePerKey, registry)
    thread = threading.Thread(target=first.drain_once)
    try:
        thread.start()
        assert inside.wait(10)
        publish_keyed(flow, OnePerKey, range(1, 3), "a")
        publish_keyed(flow, OnePerKey, range(10, 11), "b")
        second.drain_once()
        assert sorted(ran) == [0, 10]
        release.set()
        thread.join(10)
        second.drain_once()
        assert sorted(ran) == [0, 1, 2, 10]
        assert admin_query(flow, "SELECT count(*) FROM pgpubsub.lease")[0][0] == 0
    finally:
        release.set()
        thread.join(10)
        first.session.close()
        second.session.close()


@pytest.mark.parametrize(
    ("option", "value"),
    [("key_rate_limit", "0/s"), ("key_rate_limit", "x"), ("key_rate_limit", 5),
     ("key_concurrency", 0), ("key_concurrency", True), ("key_concurrency", "2"),
     ("key_concurrency", 10_001)],
)  # fmt: skip
def test_a_bad_key_limit_is_refused_at_declaration(option: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"{option} must be None"):

        @dataclass
        class Bad(Channel, lock_notifications=True, **{option: value}):  # type: ignore[call-arg]
            n: int


@pytest.mark.parametrize("option", [{"key_rate_limit": "5/s"}, {"key_concurrency": 2}])
def test_key_limits_need_a_durable_channel(option: dict[str, Any]) -> None:
    @dataclass
    class Plain(Channel, **option):  # type: ignore[call-arg]
        n: int

    with pytest.raises(ConfigurationError, match=f"{next(iter(option))} need lock_notifications"):
        spec_of(Plain)


@pytest.mark.parametrize("key", ["", "a\x00b", 7, "x" * 1025, "\ud800"])
def test_a_bad_limit_key_is_refused(flow: str, key: Any) -> None:
    with psycopg.connect(flow) as conn, pytest.raises(ConfigurationError, match="limit_key"):
        pgpubsub.notify(TwoPerKey(n=1), conn=conn, limit_key=key)


def test_limit_key_is_stored_by_every_publishing_call(flow: str) -> None:
    async def publish_async() -> None:
        async with await psycopg.AsyncConnection.connect(flow) as conn:
            await pgpubsub.anotify(TwoPerKey(n=3), conn=conn, limit_key="c")

    with psycopg.connect(flow) as conn:
        pgpubsub.notify(TwoPerKey(n=1), conn=conn, limit_key="a")
        pgpubsub.notify_many(TwoPerKey, [{"n": 2}], conn=conn, limit_key="b")
        pgpubsub.notify(TwoPerKey(n=4), conn=conn, priority=1)
    asyncio.run(publish_async())
    found = admin_query(
        flow, "SELECT (payload::json->>'n')::int, limit_key FROM pgpubsub.message ORDER BY 1"
    )
    assert found == [(1, "a"), (2, "b"), (3, "c"), (4, None)]


def test_schema_version_6_migrates_again_and_leases_know_limit_slots(flow: str) -> None:
    durable.migrate(flow)  # again: idempotent, the lease check replaced once
    checks = admin_query(
        flow,
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'lease_kind_check'",
    )
    assert len(checks) == 1 and "'limit'" in str(checks[0][0])
    admin_query(
        flow,
        "INSERT INTO pgpubsub.lease VALUES ('c', 'limit', '0' || E'\\x1f' || 'k', 'h', now())",
    )
    with pytest.raises(psycopg.errors.CheckViolation):
        admin_query(flow, "INSERT INTO pgpubsub.lease VALUES ('c', 'other', 'x', 'h', now())")


def test_a_least_privileged_worker_runs_a_key_limited_channel(flow: str) -> None:
    """`pgpubsub grant --worker` is enough for key_rate_limit and key_concurrency: bucket
    rows taken, spent and deleted once full, slots leased and given back."""
    from psycopg.conninfo import make_conninfo

    from pgpubsub import cli

    @dataclass
    class Both(Channel, lock_notifications=True, key_rate_limit="1000/s", key_concurrency=1):
        n: int

    admin_query(
        flow, "DROP ROLE IF EXISTS pgpubsub_keyed; CREATE ROLE pgpubsub_keyed LOGIN PASSWORD 'pw'"
    )
    try:
        assert cli.main(["grant", "pgpubsub_keyed", "--worker", "--dsn", flow]) == 0
        for k in range(3):
            publish_keyed(flow, Both, range(k * 10, k * 10 + 2), f"k{k}")
        registry = Registry()
        ran: list[int] = []
        registry.add(Both, lambda n: ran.append(n))
        spec = spec_of(Both)
        session = PsycopgSession(make_conninfo(flow, user="pgpubsub_keyed", password="pw"))
        proc = ChannelProcessor(session, spec, registry.listeners(spec))
        try:
            proc.drain_once()
            assert sorted(ran) == [0, 1, 10, 11, 20, 21]
            wait_until(
                lambda: (
                    proc._next_due() > 0
                    and admin_query(flow, "SELECT count(*) FROM pgpubsub.key_bucket")[0][0] == 0
                ),
                timeout=5,
                interval=0.02,
            )
            assert admin_query(flow, "SELECT count(*) FROM pgpubsub.lease")[0][0] == 0
        finally:
            proc.session.close()
    finally:
        admin_query(flow, "DROP OWNED BY pgpubsub_keyed CASCADE; DROP ROLE pgpubsub_keyed")


@dataclass
class Crowded(Channel, lock_notifications=True, key_concurrency=100, key_rate_limit="1/m"):
    n: int


#: Tables' scans, and rows read, as pg_stat_xact_user_tables counts them (see _reads).
SCANS = "coalesce(seq_scan, 0) + coalesce(idx_scan, 0)"
ROWS_READ = "coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
#: The statements of a rest's search for a key token, and of a sweep of key buckets.
RESTS = (_flow_sql.KEY_TOKEN_DUE_SQL, _flow_sql.KEY_TOKEN_DUE_FIRST_SQL)
SWEEPS = (_flow_sql.FULL_BUCKETS_SQL, _flow_sql.FULL_BUCKETS_FIRST_SQL)


def _reads(
    proc: Any, monkeypatch: pytest.MonkeyPatch, counts: str, *queries: str
) -> list[dict[str, int]]:
    """What each execution of one of ``queries`` by ``proc`` read, per pgpubsub table, as
    ``counts`` (SCANS, ROWS_READ) says: counted in its own transaction, a list that fills
    as it runs."""
    stats = (
        f"SELECT relname, {counts} FROM pg_stat_xact_user_tables "  # noqa: S608 - ours
        "WHERE schemaname = 'pgpubsub'"
    )
    reads: list[dict[str, int]] = []
    fetch = proc.session.fetch  # (a claim is fetched, in a pipeline with its SET LOCAL)

    def counting(run: Any) -> Any:
        def counted(sql: str, params: Any = (), *first: str | None) -> list[tuple[Any, ...]]:
            made_from = _claim_sql.claim_template(sql) or sql  # a claim, on its partitions
            if not any(made_from is query for query in queries):
                return run(sql, params, *first)  # type: ignore[no-any-return]
            before = dict(fetch(stats))
            rows = fetch(sql, params, *first)
            reads.append({t: n - before.get(t, 0) for t, n in fetch(stats)})
            return rows

        return counted

    monkeypatch.setattr(proc.session, "execute", counting(proc.session.execute))
    monkeypatch.setattr(proc.session, "fetch", counting(fetch))
    # Statements run together one by one, each through execute (and counted).
    monkeypatch.setattr(proc.session, "together", partial(Session.together, proc.session))
    return reads


def test_held_keys_are_found_once_per_claim_whatever_their_backlog(
    flow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 28, finding 2: a claim probed a held key's slot leases (all
    key_concurrency of them) for each row of its due backlog, so one key at its limit
    slowed every claim of the channel by its backlog times its slots (17.5 s at 100 slots
    and 20,000 messages). Invariant: a claim reads the slot leases a bounded number of
    times whatever the held keys' backlogs and slots, and a key's bucket at most once per
    message it passes over. Key a holds all its 100 slots, key b is out of tokens; 1,000
    due messages each come before 3 without a key: the claim runs the 3."""

    admin_query(
        flow,
        "INSERT INTO pgpubsub.lease (channel, kind, name, holder, expires_at) "
        "SELECT %s, 'limit', s::text || E'\\x1f' || 'a', 'elsewhere:1:x', now() + '1 hour' "
        "FROM generate_series(0, 99) s",
        (spec_of(Crowded).name,),
    )
    admin_query(
        flow,
        "INSERT INTO pgpubsub.key_bucket (channel, key, tokens, updated_at) "
        "VALUES (%s, 'b', 0, now())",
        (spec_of(Crowded).name,),
    )
    publish_keyed(flow, Crowded, range(1000), "a")
    publish_keyed(flow, Crowded, range(1000, 2000), "b")
    publish_keyed(flow, Crowded, range(5000, 5003), None)
    registry = Registry()
    ran: list[int] = []
    registry.add(Crowded, lambda n: ran.append(n))
    proc = processor(flow, Crowded, registry)
    lookups = _reads(proc, monkeypatch, SCANS, _flow_sql.LIMITED_CLAIM_SQL)
    try:
        proc.drain_once()
    finally:
        proc.session.close()
    assert sorted(ran) == [5000, 5001, 5002]
    assert lookups, "no claim was made"
    for claim in lookups:
        assert claim.get("lease", 0) <= 10 and claim.get("key_bucket", 0) <= 2000 + 10, lookups


def test_a_claim_reads_the_buckets_of_the_keys_it_meets_not_every_bucket(
    flow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 28, round 2, finding 1: the claim read every key bucket of the
    channel to find the keys out of tokens, and a channel's buckets are every key used
    within about a period (a "1/d" limit: every customer active today). At 600,000 buckets
    a claim took 15 s. Invariant: a claim reads the buckets of the keys of the messages it
    looks at, whatever the number of buckets. 20,000 empty buckets of other keys; 5 due
    messages of new keys and 3 without a key: the claim takes all 8, reading a few buckets."""

    admin_query(
        flow,
        "INSERT INTO pgpubsub.key_bucket (channel, key, tokens, updated_at) "
        "SELECT %s, 'customer-' || g, 0, now() FROM generate_series(1, 20000) g",
        (spec_of(Crowded).name,),
    )
    for k in range(5):
        publish_keyed(flow, Crowded, range(k, k + 1), f"new-{k}")
    publish_keyed(flow, Crowded, range(100, 103), None)
    registry = Registry()
    ran: list[int] = []
    registry.add(Crowded, lambda n: ran.append(n))
    proc = processor(flow, Crowded, registry)
    reads = _reads(proc, monkeypatch, ROWS_READ, _flow_sql.LIMITED_CLAIM_SQL)
    try:
        proc.drain_once()
    finally:
        proc.session.close()
    assert sorted(ran) == [0, 1, 2, 3, 4, 100, 101, 102]
    buckets = [claim.get("key_bucket", 0) for claim in reads]
    assert buckets and max(buckets) <= 50, buckets


def test_a_busy_worker_deletes_the_slot_leases_of_stopped_processes(
    flow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 28, round 2: the slot leases of a process killed in its listeners
    stayed in the table (only their holder deleted them), and each claim reads the
    channel's slot leases. Those expired for five lease periods are deleted by the next
    sweep; live ones stay, and so do those expired for less (round 3c, finding 3: a
    process stopped past its lease, SIGSTOP or a slow keeper, renews its own lease when it
    comes back, and a sweep that deleted it let a second message of the key start while
    its listener still ran)."""

    monkeypatch.setattr(_processor, "BUCKET_SWEEP_EVERY", 0.0)
    name = spec_of(Crowded).name
    admin_query(
        flow,
        "INSERT INTO pgpubsub.lease (channel, kind, name, holder, expires_at) "
        "SELECT %s, 'limit', '0' || E'\\x1f' || 'k' || g, 'gone:1:x', now() - interval '1 h' "
        "FROM generate_series(1, 50) g",
        (name,),
    )
    admin_query(
        flow,
        "INSERT INTO pgpubsub.lease (channel, kind, name, holder, expires_at) "
        "VALUES (%s, 'limit', '0' || E'\\x1f' || 'slow', 'stalled:1:x', now() - interval '5 s')",
        (name,),
    )
    admin_query(
        flow,
        "INSERT INTO pgpubsub.lease (channel, kind, name, holder, expires_at) "
        "VALUES (%s, 'limit', '0' || E'\\x1f' || 'busy', 'alive:1:x', now() + interval '1 h')",
        (name,),
    )
    publish_keyed(flow, Crowded, range(3), None)
    registry = Registry()
    registry.add(Crowded, lambda n: None)
    proc = processor(flow, Crowded, registry)
    try:
        assert proc.drain_once() == 3
    finally:
        proc.session.close()
    held = admin_query(flow, "SELECT holder FROM pgpubsub.lease ORDER BY holder")
    assert held == [("alive:1:x",), ("stalled:1:x",)]


def test_a_sweep_reads_a_slice_of_the_buckets_and_every_full_one_goes_in_turn(
    flow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 28, round 2: every processor read all of its channel's buckets every
    second while busy, to delete the full ones (a "1/d" limit keeps every key active today:
    at 600,000 buckets a sweep took a fifth of a second, per processor). Invariant: a sweep
    reads a bounded slice, and the slices go round, so that every full bucket goes in turn
    and none that is not full."""

    monkeypatch.setattr(_processor, "BUCKET_SWEEP_EVERY", 0.0)
    monkeypatch.setattr(_processor, "BUCKET_SLICE", 500)
    name = spec_of(Crowded).name
    admin_query(
        flow,
        "INSERT INTO pgpubsub.key_bucket (channel, key, tokens, updated_at) "
        "SELECT %s, 'k' || pg_catalog.lpad(g::text, 5, '0'), 0, "
        "CASE WHEN g %% 2 = 0 THEN now() - interval '1 day' ELSE now() END "
        "FROM generate_series(1, 2250) g",
        (name,),
    )  # the even ones refilled long ago (full), the odd ones empty
    proc = processor(flow, Crowded)
    sweeps = _reads(proc, monkeypatch, ROWS_READ, *SWEEPS)
    proc.session.open()
    try:
        admin_query(flow, "ANALYZE pgpubsub.key_bucket")
        for _ in range(6):  # 5 slices go round once; the sixth starts again
            proc._sweep_limits()
    finally:
        proc.session.close()
    # the slice, its full ones locked, then deleted: each bucket read at most three times
    reads = [sweep.get("key_bucket", 0) for sweep in sweeps]
    assert len(reads) == 6 and max(reads) <= 3 * 500, reads
    left = admin_query(flow, "SELECT key FROM pgpubsub.key_bucket ORDER BY key")
    assert [int(k[1:]) for (k,) in left] == list(range(1, 2251, 2))


def test_a_worker_out_of_key_tokens_reads_the_buckets_of_keys_with_messages_only(
    flow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 28, round 2: before sleeping, a worker read every bucket of its
    channel to find when the next token of a key with a due message comes (213 ms at
    300,000 buckets). Invariant: it reads the buckets of the keys that have pending
    messages, whatever the number of buckets. 20,000 empty buckets of keys without
    messages, and key a out of tokens with a due message: the wait is a's next token."""

    name = spec_of(TwoPerKey).name
    admin_query(
        flow,
        "INSERT INTO pgpubsub.key_bucket (channel, key, tokens, updated_at) "
        "SELECT %s, 'customer-' || g, 0, now() FROM generate_series(1, 20000) g",
        (name,),
    )
    publish_keyed(flow, TwoPerKey, range(3), "a")
    proc = processor(flow, TwoPerKey, poll_interval=5.0)
    rests = _reads(proc, monkeypatch, ROWS_READ, *RESTS)
    try:
        proc.drain_once()
        assert proc.claimed == 1  # a bucket of 1
        wait = proc._next_due()
    finally:
        proc.session.close()
    assert 0.3 < wait <= 0.5, wait  # a's next token
    reads = [rest.get("key_bucket", 0) for rest in rests]
    assert reads and max(reads) <= 10, reads


def test_a_resting_worker_looks_at_a_bounded_number_of_limit_keys(
    flow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 28, round 4, finding 1: before sleeping, the worker visited every
    limit key with a pending message, delayed ones included (scheduled work per customer:
    30,000 keys made each rest cost 300 ms, and the idle worker a busy backend). Invariant:
    a rest looks at a bounded number of keys, going round them from rest to rest; a key
    beyond them waits at most the poll interval."""

    name = spec_of(TwoPerKey).name
    admin_query(
        flow,
        "INSERT INTO pgpubsub.message (channel, payload, limit_key, run_at) "
        "SELECT %s, '{\"n\": 0}', 'customer-' || g, now() + interval '1 hour' "
        "FROM generate_series(1, 3000) g",
        (name,),
    )
    proc = processor(flow, TwoPerKey, poll_interval=5.0)
    rests = _reads(proc, monkeypatch, SCANS, *RESTS)
    proc.session.open()
    try:
        for _ in range(3):
            proc._next_due()
    finally:
        proc.session.close()
    bound = 3 * getattr(_processor, "KEYS_PER_REST", 200)  # (a name this change gives it)
    probes = [rest.get("message", 0) for rest in rests]
    assert len(probes) == 3 and max(probes) <= bound, probes


def test_a_held_key_gets_its_next_token_at_every_rest_beside_many_scheduled_keys(
    flow: str,
) -> None:
    """Review of issue 28, round 5, finding 1: with more limit keys of pending messages than
    a rest looks at (scheduled work per customer), a key out of tokens with a due backlog was
    among them only now and then; at the other rests the worker slept its whole poll, and a
    "10/s" key ran at about one message a poll. Invariant: a key whose due messages are the
    first a claim would take is looked at every rest, however many other keys there are."""
    name = spec_of(TwoPerKey).name
    admin_query(
        flow,
        "INSERT INTO pgpubsub.message (channel, payload, limit_key, run_at) "
        "SELECT %s, '{\"n\": 0}', 'customer-' || g, now() + interval '1 hour' "
        "FROM generate_series(1, 3000) g",
        (name,),
    )
    publish_keyed(flow, TwoPerKey, range(3), "zz")  # after every customer key
    proc = processor(flow, TwoPerKey, poll_interval=5.0)
    try:
        proc.drain_once()
        assert proc.claimed == 1  # a bucket of 1
        waits = [proc._next_due() for _ in range(4)]
    finally:
        proc.session.close()
    assert all(0.2 < wait <= 0.5 for wait in waits), waits


@dataclass
class TwoPerKeyOneAtATime(
    Channel, lock_notifications=True, key_rate_limit="2/s", key_concurrency=1
):
    n: int


def _delayed_keys(dsn: str, channel: Any, count: int) -> None:
    """``count`` limit keys whose only message is an hour away (scheduled work)."""
    admin_query(
        dsn,
        "INSERT INTO pgpubsub.message (channel, payload, limit_key, run_at) "
        "SELECT %s, '{\"n\": 0}', 'customer-' || g, now() + interval '1 hour' "
        "FROM generate_series(1, %s) g",
        (spec_of(channel).name, count),
    )


def test_a_held_key_of_ordered_messages_gets_its_next_token_at_every_rest(flow: str) -> None:
    """Review of issue 28, round 6, finding 1: the keys a rest looked at first were those of
    due messages without an ordering key; a key out of tokens whose messages have ordering
    keys was found only by the walk of pending keys, and ran at one message a poll beside
    many scheduled keys."""
    _delayed_keys(flow, TwoPerKey, 3000)
    with psycopg.connect(flow) as conn:
        for n in range(3):
            pgpubsub.notify(TwoPerKey(n=n), conn=conn, limit_key="zz", ordering_key=f"o{n}")
    proc = processor(flow, TwoPerKey, poll_interval=5.0)
    try:
        proc.drain_once()
        assert proc.claimed == 1  # a bucket of 1
        waits = [proc._next_due() for _ in range(4)]
    finally:
        proc.session.close()
    assert all(0.2 < wait <= 0.5 for wait in waits), waits


def test_a_held_key_behind_a_key_at_its_concurrency_gets_its_next_token(flow: str) -> None:
    """Review of issue 28, round 6, finding 2: the due messages a rest looked at first
    included those of keys at their key_concurrency, which a claim passes over; 1,000 of them
    ahead of a key out of tokens hid it, and that key ran at one message a poll."""
    name = spec_of(TwoPerKeyOneAtATime).name
    _delayed_keys(flow, TwoPerKeyOneAtATime, 3000)
    publish_keyed(flow, TwoPerKeyOneAtATime, range(1000), "busy")  # first in claim order
    admin_query(
        flow,
        "INSERT INTO pgpubsub.lease (channel, kind, name, holder, expires_at) "
        "VALUES (%s, 'limit', '0' || E'\\x1f' || 'busy', 'elsewhere:1:x', now() + '1 hour')",
        (name,),
    )
    publish_keyed(flow, TwoPerKeyOneAtATime, range(1000, 1003), "zz")
    proc = processor(flow, TwoPerKeyOneAtATime, poll_interval=5.0)
    try:
        proc.drain_once()
        assert proc.claimed == 1  # zz's bucket of 1; busy's slot is taken elsewhere
        waits = [proc._next_due() for _ in range(4)]
    finally:
        proc.session.close()
    assert all(0.2 < wait <= 0.5 for wait in waits), waits


@dataclass
class Paced1(Channel, lock_notifications=True, concurrency=1, rate_limit="5/s"):
    n: int


@dataclass
class Paced2(Channel, lock_notifications=True, concurrency=2, rate_limit="5/s"):
    n: int


@dataclass
class Paced8(Channel, lock_notifications=True, concurrency=8, rate_limit="5/s"):
    n: int


@dataclass
class KeyPaced1(Channel, lock_notifications=True, concurrency=1, key_rate_limit="5/s"):
    n: int


@dataclass
class KeyPaced4(Channel, lock_notifications=True, concurrency=4, key_rate_limit="5/s"):
    n: int


@pytest.mark.parametrize("cls", [Paced1, Paced2, Paced8, KeyPaced1, KeyPaced4])
def test_a_burst_under_one_wake_up_runs_at_the_rate_at_every_concurrency(
    dsn: str, cls: Any
) -> None:
    """12 messages in one transaction (one wake-up) to a channel or key limited to 5/s
    (a bucket of one token) start one every 0.2 s, never faster and never waiting for
    the poll (30 s here), at every concurrency. With two processors or more, the one
    whose claim took the last token went to sleep without asking when the next is due,
    and the poller, whose own last claim had not run out of tokens, did not wait for
    one: the rest of the burst waited for the poll."""
    durable.migrate(dsn)
    started: dict[int, float] = {}
    registry = Registry()
    registry.add(cls, lambda n: started.setdefault(n, time.monotonic()))
    runner = DurableRunning(dsn, [cls], registry, poll_interval=30)
    try:
        time.sleep(0.5)  # asleep: the publisher wakes it
        key = {"limit_key": "a"} if cls.__name__.startswith("Key") else {}
        with psycopg.connect(dsn) as conn:
            pgpubsub.notify_many(cls, [{"n": n} for n in range(12)], conn=conn, **key)
        published = time.monotonic()
        wait_until(lambda: len(started) == 12, timeout=40)
    finally:
        runner.stop()
    times = sorted(started.values())
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    assert times[-1] - published < 11 * 0.2 + 1.0, gaps  # about 2.2 s at the rate
    # And never faster: the rate limits claims, 0.2 s apart; a listener may start up
    # to 0.1 s after its claim (a loaded machine), never before.
    assert all(
        b - a >= (j - i) * 0.2 - 0.1
        for (i, a), (j, b) in itertools.combinations(enumerate(times), 2)
    ), gaps


@pytest.mark.parametrize("cls", [Paced1, Paced2, Paced8, KeyPaced1, KeyPaced4])
def test_a_rate_limited_burst_costs_about_a_claim_a_token_at_every_concurrency(
    dsn: str, cls: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile review 12 of issue 26, finding 3: 20 messages at 5/s cost 21 claims at
    concurrency 1 and 40-42 at 4, 8 and 32, half of them empty: with several processors
    a claim starts at one message, so the claim that took the last token came back full
    and its processor claimed again at once, with no token to take. Invariant: a claim
    that took the channel's (or a key's) last token is not followed by another of the
    same processor before a token is due."""
    durable.migrate(dsn)
    started: dict[int, float] = {}
    claims = record_calls(monkeypatch, "_claim")
    registry = Registry()
    registry.add(cls, lambda n: started.setdefault(n, time.monotonic()))
    runner = DurableRunning(dsn, [cls], registry, poll_interval=30)
    try:
        time.sleep(0.5)  # asleep: the publisher wakes it
        claims.clear()
        key = {"limit_key": "a"} if cls.__name__.startswith("Key") else {}
        with psycopg.connect(dsn) as conn:
            pgpubsub.notify_many(cls, [{"n": n} for n in range(12)], conn=conn, **key)
        wait_until(lambda: len(started) == 12, timeout=40)
    finally:
        runner.stop()
    sizes = [len(rows) for _, rows in claims]
    assert sum(sizes) == 12
    # A claim a token, and a few looks: 3 at concurrency 4 (a claim starts at one
    # message, each processor's first finds the key out of tokens), 4 on a loaded
    # machine; the defect made 40-42.
    assert len(sizes) <= 12 + 4, str(sizes)


@dataclass
class OneSlot2(Channel, lock_notifications=True, concurrency=2, max_in_flight=1):
    n: int


@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_a_message_waiting_for_a_slot_held_by_a_long_job_costs_no_questions(
    dsn: str, delay: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile review 16 of issue 26: M1 holds the channel's only slot (max_in_flight=1);
    M2 is published, or comes due, meanwhile. The idle processor asked when the next
    message was due about every 2 ms until the slot came back (1,800 questions and 6,900
    commits in 4 s): M2 was due since the last claim, and no claim ran (no slot) to move
    that on. Invariant: a message that waits for a slot costs nothing until its wake-up;
    it starts once the slot is given back."""
    durable.migrate(dsn)
    asks = record_calls(monkeypatch, "_next_due")
    started: dict[int, float] = {}
    release = threading.Event()

    def listener(n: int) -> None:
        started[n] = time.monotonic()
        if n == 1:
            release.wait(10)

    registry = Registry()
    registry.add(OneSlot2, listener)
    runner = DurableRunning(dsn, [OneSlot2], registry, poll_interval=30)
    try:
        time.sleep(0.5)
        with psycopg.connect(dsn) as conn:
            pgpubsub.notify(OneSlot2(n=1), conn=conn)
        wait_until(lambda: 1 in started, timeout=5)
        with psycopg.connect(dsn) as conn:
            pgpubsub.notify(OneSlot2(n=2), conn=conn, **({"delay": delay} if delay else {}))
        time.sleep(delay + 0.5)
        asks.clear()
        time.sleep(1.5)
        questions = len(asks)
        release.set()
        released = time.monotonic()
        wait_until(lambda: 2 in started, timeout=10)
    finally:
        release.set()
        runner.stop()
    assert questions <= 3, questions
    assert started[2] - released < 1.0


@dataclass
class KeyRefills(Channel, lock_notifications=True, concurrency=1, key_rate_limit="20/s"):
    n: int


@pytest.mark.parametrize("late_by", [0.15, 1.1])
def test_a_key_passed_over_for_tokens_is_claimed_once_refilled_however_late_the_question(
    dsn: str, monkeypatch: pytest.MonkeyPatch, late_by: float
) -> None:
    """Hostile review 15 of issue 26, finding 3: key a has used its 2 tokens (20/s); a3 of
    key a and b1 of a fresh key are published: the claim takes b1 (b keeps a token) and
    passes a3 over. The question after it counted a key's next token only while the key
    was still out of tokens, or when the claim's own keys were: a refilled (50 ms) before
    a question that came late (a loaded machine, or b1's listener long; here slowed by
    ``late_by``), so a3 waited for the poll (10 s). Review 18, finding 1: a second late,
    the sweep of full buckets before the question had deleted a's (refilled to its
    capacity), and a question does not see a key without a bucket. Invariant: a message
    passed over for its key's tokens is claimed once they refill, however late the
    question comes."""
    durable.migrate(dsn)
    due = ChannelProcessor._next_due
    late = threading.Event()  # set once b1 started: the next question comes late

    def slow(self: ChannelProcessor) -> float:
        if late.is_set():
            late.clear()
            time.sleep(late_by)
        return due(self)

    monkeypatch.setattr(ChannelProcessor, "_next_due", slow)
    started: dict[str, float] = {}
    first = threading.Event()

    def listener(n: int) -> None:
        started.setdefault(f"{n}", time.monotonic())
        first.set()
        if n == 4:
            late.set()

    registry = Registry()
    registry.add(KeyRefills, listener)
    runner = DurableRunning(dsn, [KeyRefills], registry, poll_interval=10)
    try:
        time.sleep(0.5)
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgpubsub.notify_many(KeyRefills, [{"n": 1}, {"n": 2}], conn=conn, limit_key="a")
            first.wait(5)
            with conn.transaction():
                pgpubsub.notify(KeyRefills(n=3), conn=conn, limit_key="a")
                pgpubsub.notify(KeyRefills(n=4), conn=conn, limit_key="b")
        published = time.monotonic()
        wait_until(lambda: len(started) == 4, timeout=15)
    finally:
        runner.stop()
    assert started["3"] - published < late_by + 1.0, started["3"] - published


@dataclass
class RateAndKeyRate(
    Channel,
    lock_notifications=True,
    concurrency=1,
    rate_limit=(100, timedelta(seconds=1000)),
    key_rate_limit=(100, timedelta(seconds=100)),
):
    n: int


def test_a_message_waiting_for_the_channels_token_costs_no_questions_once_its_key_refills(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile review 18 of issue 26, finding 2: a claim took 10 messages of key a, the
    channel's 10 tokens and key a's 10 (channel: one token in 10 s; key: one a second).
    The 11th waits for the channel's token. The claim left the crew short of key tokens,
    and a claim that finds no channel token never reaches the key limits to clear that:
    once key a had a token again, every question said "due now" and every claim found
    no channel token, about 330 of each a second until the channel's token came.
    Invariant: a message that waits for a token costs nothing until the token is due."""
    durable.migrate(dsn)
    claims = record_calls(monkeypatch, "_claim")
    asks = record_calls(monkeypatch, "_next_due")
    started: list[int] = []
    registry = Registry()
    registry.add(RateAndKeyRate, lambda n: started.append(n))
    runner = DurableRunning(dsn, [RateAndKeyRate], registry, poll_interval=30)
    try:
        time.sleep(0.5)
        with psycopg.connect(dsn, autocommit=True) as conn:
            ns = [{"n": n} for n in range(11)]
            pgpubsub.notify_many(RateAndKeyRate, ns, conn=conn, limit_key="a")
        published = time.monotonic()
        wait_until(lambda: len(started) == 10, timeout=5)
        time.sleep(max(0.0, published + 3.5 - time.monotonic()))
    finally:
        runner.stop()
    held = [t for t, _ in claims + asks if published + 1.5 <= t < published + 3.5]
    assert len(started) == 10  # the 11th waits for the channel's token
    assert len(held) <= 4, len(held)


@dataclass
class KeyBehindHead(
    Channel, lock_notifications=True, concurrency=4, key_rate_limit=(1, timedelta(seconds=1))
):
    n: int


def test_a_key_held_by_its_ordering_key_costs_no_claims_while_another_key_streams(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile review 19 of issue 26: b1 (limit key b, ordering key o) runs a long listener
    and b2 waits behind it, its bucket full; key a streams one message a second (its
    token). Each claim of a left the crew short of key tokens, and the question after it
    counted every key with a whole token as due now, b too (its full bucket kept while
    b2 is due): two empty claims a second. Invariant: a message held for another reason
    than its key's tokens costs no claims; only the keys a claim left short are due to
    the question once refilled."""
    durable.migrate(dsn)
    claims = record_calls(monkeypatch, "_claim")
    release = threading.Event()
    started: list[int] = []

    def listener(n: int) -> None:
        started.append(n)
        if n == 1:
            release.wait(9)

    registry = Registry()
    registry.add(KeyBehindHead, listener)
    runner = DurableRunning(dsn, [KeyBehindHead], registry, poll_interval=30)
    try:
        time.sleep(0.5)
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgpubsub.notify(KeyBehindHead(n=1), conn=conn, limit_key="b", ordering_key="o")
            wait_until(lambda: 1 in started, timeout=5)
            pgpubsub.notify(KeyBehindHead(n=2), conn=conn, limit_key="b", ordering_key="o")
            ns = [{"n": 100 + i} for i in range(20)]
            pgpubsub.notify_many(KeyBehindHead, ns, conn=conn, limit_key="a")
        published = time.monotonic()
        time.sleep(5.0)
        release.set()
    finally:
        release.set()
        runner.stop()
    held = [t for t, rows in claims if not rows and published + 2.0 <= t < published + 5.0]
    assert sum(1 for n in started if n >= 100) >= 4  # a streamed at its rate meanwhile
    assert len(held) <= 1, len(held)


@dataclass
class KeyBehindSlow(
    Channel, lock_notifications=True, concurrency=1, retry_delay=20, key_rate_limit="1/s"
):
    n: int


def test_a_keys_starts_keep_its_rate_when_one_waits_behind_a_slow_listener(dsn: str) -> None:
    """A key's token is taken as its message is claimed, and a batch's messages start one
    after another: a message of key k claimed behind a 3 s listener (a message without a
    limit key) started 3 s after its token, as another worker started k's next ones at
    their tokens: two starts of k 21-24 ms apart at 1/s (hostile review 20 of issue 26).
    Invariant: a key's starts keep its rate, as its claims do, up to half a token's
    interval (any window of one period holds no more than count + capacity): a message
    that would start later than that after its batch's first goes back, its token spent,
    and is claimed again with a token of its own."""
    durable.migrate(dsn)
    starts: list[tuple[float, int]] = []
    lock = threading.Lock()

    def listener(n: int) -> None:
        with lock:
            starts.append((time.monotonic(), n))
        if n == 0:
            time.sleep(3.0)

    registry = Registry()
    registry.add(KeyBehindSlow, listener)
    runners = [DurableRunning(dsn, [KeyBehindSlow], registry, poll_interval=30) for _ in range(2)]
    try:
        time.sleep(0.7)  # both asleep
        with psycopg.connect(dsn) as conn:
            pgpubsub.notify(KeyBehindSlow(n=0), conn=conn)
            pgpubsub.notify_many(
                KeyBehindSlow, [{"n": n} for n in range(1, 7)], conn=conn, limit_key="k"
            )
        wait_until(lambda: len(starts) == 7, timeout=20)
    finally:
        for runner in runners:
            runner.stop()
    assert sorted(n for _, n in starts) == list(range(7))
    k = sorted(t for t, n in starts if n >= 1)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(k)]
    # 1/s, a bucket of one: n starts span (n - 1) s at least, less 0.5 s and a jitter.
    assert all(
        b - a >= (j - i) * 1.0 - 0.5 - 0.05
        for (i, a), (j, b) in itertools.combinations(enumerate(k), 2)
    ), gaps


@dataclass
class KeyAtTheGate(
    Channel, lock_notifications=True, concurrency=2, retry_delay=20, key_rate_limit="1/s"
):
    n: int


def test_a_keys_starts_keep_its_rate_after_a_wait_for_a_turn_alone(dsn: str) -> None:
    """Batches wait at the process's gate while a message suspected of crashing it runs
    alone: a batch's first message counted its leeway from its own start, so two
    processors that claimed key k's messages a second apart during the wait started them
    together once it ended. Invariant: as
    test_a_keys_starts_keep_its_rate_when_one_waits_behind_a_slow_listener, whatever a
    batch waited for before its first listener."""
    from pgpubsub._processor import GATE

    durable.migrate(dsn)
    starts: list[float] = []
    registry = Registry()
    registry.add(KeyAtTheGate, lambda n: starts.append(time.monotonic()))
    runner = DurableRunning(dsn, [KeyAtTheGate], registry, poll_interval=30)
    alone, release = threading.Event(), threading.Event()

    def turn_alone() -> None:  # as a suspect's listener running alone for 1.5 s
        with GATE.exclusive():
            alone.set()
            release.wait(10)

    holder = threading.Thread(target=turn_alone)
    try:
        time.sleep(0.5)
        holder.start()
        assert alone.wait(5)
        with psycopg.connect(dsn) as conn:
            pgpubsub.notify_many(
                KeyAtTheGate, [{"n": n} for n in range(3)], conn=conn, limit_key="k"
            )
        time.sleep(1.5)  # k's first two messages claimed meanwhile, a second apart
        release.set()
        wait_until(lambda: len(starts) == 3, timeout=20)
    finally:
        release.set()
        holder.join()
        runner.stop()
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(sorted(starts))]
    assert all(gap >= 1.0 - 0.5 - 0.05 for gap in gaps), gaps
