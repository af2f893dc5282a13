"""`pgpubsub demo` as a person sees it: a real 80x24 terminal (tmux), a pipe, odd counts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import admin_query

from pgpubsub import embedded
from pgpubsub.errors import ConfigurationError

pytestmark = pytest.mark.acceptance


def demo(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgpubsub", "demo", "--dsn", dsn, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by .ci/run")
def test_demo_in_an_80_by_24_terminal(dsn: str, tmp_path: Path) -> None:
    session = f"pgpubsub-demo-{os.getpid()}"
    done = tmp_path / "exit"
    command = (
        f"{sys.executable} -m pgpubsub demo --messages 3000 --dsn '{dsn}'; "
        f"echo $? > {done}; sleep 600"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command], check=True
    )
    try:
        deadline = time.monotonic() + 120
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        screen = subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
        ).stdout
        joined = subprocess.run(
            ["tmux", "capture-pane", "-p", "-J", "-t", session], capture_output=True, text=True
        ).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert done.read_text().strip() == "0", screen
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    # Nothing wrapped: joining wrapped lines changes nothing; nothing wider than 79.
    assert joined.splitlines() == screen.splitlines(), screen
    assert all(len(line) <= 79 for line in lines), screen
    # No stale progress: every bar was replaced by its act's final line.
    assert not [line for line in lines if line.startswith("[")], screen
    text = "\n".join(lines)
    assert "delivered 3,000 of 3,000 in " in text
    assert "Order 13 (message " in text
    assert "shipped 2,999 of 3,000 orders in " in text
    assert "rows written: 2,999 for 2,999 orders (each exactly once, by 2 workers); dead: 1" in (
        text.replace("\n    ", " ")
    )
    # The log lines about the poison message name the message id the story gave.
    message_id = text.split("Order 13 (message ", 1)[1].split(")", 1)[0]
    assert f"message {message_id} on pgpubsub._demo.Order failed (attempt 1 of 3)" in (
        text.replace("\n    ", " ")
    )


def test_demo_piped_prints_plain_lines_and_keeps_the_dead_message_it_points_to(dsn: str) -> None:
    out = demo(dsn, "--messages", "2000")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "\r" not in out.stdout and "\x1b" not in out.stdout
    assert "delivered 2,000 of 2,000 in " in out.stdout
    assert "rows written: 1,999 for 1,999 orders (each exactly once, by " in out.stdout
    assert "dead: 1 (order 13, after 3 attempts)" in out.stdout
    assert admin_query(dsn, "SELECT to_regclass('pgpubsub_demo_shipments')") == [(None,)]
    # The closing hint is true: the message it names is there, dead, with its error.
    ((mid, status, error),) = admin_query(
        dsn, "SELECT id, status, last_error FROM pgpubsub.message"
    )
    assert status == "dead" and "order 13 has no address" in str(error)
    assert f"`pgpubsub messages show {mid}`" in out.stdout
    shown = subprocess.run(
        [sys.executable, "-m", "pgpubsub", "messages", "show", str(mid), "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0 and "order 13 has no address" in shown.stdout


@pytest.mark.parametrize(
    ("count", "says"),
    [
        ("0", "rows written: 0 for 0 orders"),
        ("1", "rows written: 0 for 0 orders (each exactly once, by 0 workers); dead: 1 (order 1"),
        ("10", "rows written: 9 for 9 orders"),
    ],
)
def test_demo_any_message_count_works(dsn: str, count: str, says: str) -> None:
    started = time.monotonic()
    out = demo(dsn, "--messages", count)
    assert out.returncode == 0, out.stdout + out.stderr
    assert says in out.stdout
    assert time.monotonic() - started < 30


def test_demo_refuses_a_negative_count(dsn: str) -> None:
    out = demo(dsn, "--messages", "-5")
    assert out.returncode == 2 and "is negative" in out.stderr and "Traceback" not in out.stderr


def test_embedded_server_changes_nothing_on_the_machine_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As root with no `postgres` user, the demo's server explains instead of adding a user."""
    ran: list[list[str]] = []
    monkeypatch.setattr(embedded.os, "geteuid", lambda: 0)
    monkeypatch.setattr(embedded.pwd, "getpwnam", lambda name: (_ for _ in ()).throw(KeyError))
    monkeypatch.setattr(embedded.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    with pytest.raises(ConfigurationError, match="no `postgres` user: run this as another user"):
        embedded.EmbeddedServer(prepare=False)
    assert ran == []


def test_demo_ctrl_c_is_clean(dsn: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpubsub", "demo", "--messages", "5000000", "--dsn", dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a shell's background job (`.ci/run &`) ignores SIGINT,
        # and its children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(4)
    proc.send_signal(signal.SIGINT)  # as Ctrl-C
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "interrupted" in out
    assert admin_query(dsn, "SELECT to_regclass('pgpubsub_demo_shipments')") == [(None,)]
