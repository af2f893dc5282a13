"""The worker's health endpoint (``--health-port``): fast whatever the database does, and
failing when the worker itself is stuck."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import admin_query, wait_until

from pgpubsub._probes import Probes
from pgpubsub._processor import ProcessorStatus
from pgpubsub.durable import migrate
from pgpubsub.engine import Status
from pgpubsub.worker import WorkerStatus

SCRIPT = str(Path(sys.executable).parent / "pgpubsub")

APP = '''
import time
from dataclasses import dataclass

import pgpubsub
from pgpubsub.channel import Channel


@dataclass
class Job(Channel, name="jobs", lock_notifications=True):
    n: int


@pgpubsub.listener(Job)
def job(n: int) -> None:
    pass


@dataclass
class Block(Channel, name="block"):
    seconds: float


@pgpubsub.listener(Block)
async def block(seconds: float) -> None:
    time.sleep(seconds)  # a bug: blocks the worker's event loop
'''


def status(state: str = "listening", alive: bool = True) -> WorkerStatus:
    engine = Status(state, frozenset({"jobs"}), 1, 0, None, 0, 0, 0, False)
    return WorkerStatus(engine, (ProcessorStatus("jobs", 0, 0, 1, alive),))


@pytest.mark.unit
def test_the_reports_of_each_state() -> None:
    probes = Probes(stall=1.0)
    assert probes.report(ready=False)[0] is True  # starting: live
    assert probes.report(ready=True) == (
        False,
        {"ok": False, "problems": ["the worker is starting"], "loop_age": pytest.approx(0, abs=1)},
    )
    probes.beat(status())
    assert probes.report(ready=True)[0] and probes.report(ready=False)[0]
    probes.beat(status(state="reconnecting"))  # the database is away: live, not ready
    assert probes.report(ready=False)[0] and not probes.report(ready=True)[0]
    probes.beat(status(alive=False))
    ok, body = probes.report(ready=False)
    assert not ok and body["problems"] == ["the processor thread of channel 'jobs' died"]
    probes.beat(status())
    probes._state = (time.monotonic() - 2.0, probes._state[1])  # the loop stopped turning
    ok, body = probes.report(ready=False)
    assert not ok and body["problems"][0].startswith("the event loop has not turned for 2.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def probe(port: int, path: str) -> tuple[int, dict[str, object], float]:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            code, body = r.status, r.read()
    except urllib.error.HTTPError as err:
        code, body = err.code, err.read()
    return code, json.loads(body), time.perf_counter() - started


@pytest.fixture
def worker(dsn: str, tmp_path: Path) -> Iterator[int]:
    migrate(dsn)
    (tmp_path / "probed.py").write_text(textwrap.dedent(APP))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [SCRIPT, "listen", "probed", "--worker", "--health-port", str(port),
         "--health-stall", "1"],
        cwd=tmp_path,
        env={**env, "PGPUBSUB_DSN": dsn},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: _ready(port), timeout=30, interval=0.1)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def _ready(port: int) -> bool:
    try:
        return probe(port, "/readyz")[0] == 200
    except OSError:
        return False


@pytest.mark.acceptance
def test_probes_answer_within_100ms_while_the_database_is_frozen(dsn: str, worker: int) -> None:
    with psycopg.connect(dsn) as frozen:
        frozen.execute("LOCK TABLE pgpubsub.message IN ACCESS EXCLUSIVE MODE")
        # The worker's next claim (its poll) waits on the lock: the database is frozen for it.
        wait_until(
            lambda: admin_query(
                dsn,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgpubsub'"
                " AND wait_event_type = 'Lock'",
            )[0][0]
            >= 1,
            timeout=20,
            interval=0.1,
        )
        times = []
        for _ in range(20):
            code, body, took = probe(worker, "/livez")
            assert code == 200, body
            times.append(took)
            code, body, took = probe(worker, "/readyz")
            assert code == 200, body  # last known: listening
            times.append(took)
            time.sleep(0.05)
        frozen.rollback()
    assert max(times) < 0.1, times


@pytest.mark.acceptance
def test_liveness_fails_while_a_listener_blocks_the_event_loop(dsn: str, worker: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""SELECT pg_notify('block', '{"seconds": 4}')""")
    deadline = time.monotonic() + 10
    while True:
        code, body, took = probe(worker, "/livez")
        assert took < 0.1
        if code == 503:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    problems = body["problems"]
    assert isinstance(problems, list) and "event loop has not turned" in problems[0]
    wait_until(lambda: probe(worker, "/livez")[0] == 200, timeout=10, interval=0.1)
