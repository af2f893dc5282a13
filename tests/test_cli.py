"""`pgpubsub listen` as real processes: supervision, signals, restarts (acceptance tier)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import admin_query, wait_until

import pgpubsub

pytestmark = pytest.mark.acceptance

TESTS = Path(__file__).parent


def children_of(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


class Listen:
    def __init__(self, dsn: str, *args: str, env: dict[str, str] | None = None):
        self.env = {**os.environ, "PGPUBSUB_DSN": dsn, "PYTHONPATH": str(TESTS), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgpubsub", "listen", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def workers(self) -> set[int]:
        return children_of(self.proc.pid)

    def output(self) -> str:
        return self.proc.stdout.read() if self.proc.stdout else ""


@pytest.fixture
def effects(dsn: str) -> Iterator[str]:
    admin_query(dsn, "CREATE TABLE effects (kind text, n int, pid int)")
    yield dsn


def wait_listening(dsn: str, count: int) -> None:
    wait_until(
        lambda: (
            admin_query(
                dsn,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgpubsub' "
                "AND query LIKE 'LISTEN%%'",
            )[0][0]
            >= count
        ),
        timeout=20,
    )


def publish(dsn: str, channel: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(n):
            pgpubsub.notify(channel, conn=conn, n=i)


def test_two_processes_each_receive_each_plain_message_and_sigterm_exits_0(effects: str) -> None:
    run = Listen(effects, "app.listeners", "--channels", "app.channels.Created", "--processes", "2")
    wait_until(lambda: len(run.workers()) == 2, timeout=10)
    workers = run.workers()
    wait_listening(effects, 2)
    publish(effects, "app.channels.Created", 10)
    wait_until(lambda: admin_query(effects, "SELECT count(*) FROM effects")[0][0] == 20)
    rows = admin_query(effects, "SELECT pid, count(*) FROM effects GROUP BY pid")
    assert {pid for pid, _ in rows} == workers and all(c == 10 for _, c in rows)
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(20) == 0
    assert not any(alive(p) for p in workers), "orphaned workers"


def test_parent_channel_selects_subclasses(effects: str) -> None:
    run = Listen(effects, "app.listeners", "--channels", "app.channels.Event")
    wait_listening(effects, 1)
    publish(effects, "app.channels.Created", 1)
    publish(effects, "app.channels.Deleted", 1)
    wait_until(lambda: admin_query(effects, "SELECT count(*) FROM effects")[0][0] == 2)
    assert sorted(admin_query(effects, "SELECT kind FROM effects")) == [("created",), ("deleted",)]
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(20) == 0


def test_killed_child_is_restarted_within_2s(effects: str) -> None:
    run = Listen(effects, "app.listeners", "--processes", "2")
    wait_until(lambda: len(run.workers()) == 2, timeout=10)
    victim = sorted(run.workers())[0]
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    wait_until(lambda: len(run.workers() - {victim}) == 2, timeout=5)
    assert time.monotonic() - started < 2.0
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(20) == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["app.broken"],
            "cannot import 'app.broken': ImportError: this module is broken on purpose",
        ),
        (["no_such_module_here"], "cannot import 'no_such_module_here'"),
        (["app.listeners", "--channels", "app.channels.Nope"], "app.channels.Nope"),
        (["app.listeners", "--channels", "app.channels.Colour"], "app.channels.Colour"),
    ],
)
def test_configuration_errors_end_listen_at_once_in_one_line(
    dsn: str, args: list[str], says: str
) -> None:
    started = time.monotonic()
    run = Listen(dsn, *args, "--processes", "2")
    code = run.proc.wait(30)
    out = run.output()
    assert code == 6, out
    assert time.monotonic() - started < 10
    assert "Traceback" not in out and "started worker" not in out
    assert out.strip().count("\n") == 0 and says in out, out


def test_sigterm_with_handler_in_flight_finishes_it(effects: str) -> None:
    run = Listen(
        effects, "app.listeners", "--channels", "app.channels.Created", env={"SLOW_HANDLER": "1.5"}
    )
    wait_listening(effects, 1)
    publish(effects, "app.channels.Created", 1)
    time.sleep(0.5)  # the handler is now sleeping inside its 1.5 s
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(20) == 0
    assert admin_query(effects, "SELECT count(*) FROM effects") == [(1,)]
