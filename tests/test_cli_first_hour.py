"""The command line as a first-time user meets it, in a project folder of their own.

The ``pgpubsub`` script (not ``python -m``, which puts the working directory on
the import path by itself) runs in a folder holding ``myapp/tasks.py``, with no
PYTHONPATH: modules are found there, a channel goes by its dotted path or its
name everywhere, unknown channels are errors, messages are published from the
shell, and the Python API takes every option of the CLI with the same name.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from helpers import admin_query, wait_until

from pgpubsub import cli, messages
from pgpubsub.durable import Options, migrate

pytestmark = pytest.mark.acceptance

SCRIPT = str(Path(sys.executable).parent / "pgpubsub")

TASKS = '''
from dataclasses import dataclass

import pgpubsub
from pgpubsub.channel import Channel


@dataclass
class SendEmail(Channel, name="emails", lock_notifications=True, max_attempts=1):
    to: str


@pgpubsub.listener(SendEmail)
def send(to: str) -> None:
    if to == "nobody":
        raise LookupError(f"no mailbox for {to!r}")
'''


@pytest.fixture
def project(tmp_path: Path, dsn: str) -> Path:
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "tasks.py").write_text(textwrap.dedent(TASKS))
    return tmp_path


def env(dsn: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PGPUBSUB_DSN")}
    return {**base, "PGPUBSUB_DSN": dsn}


def pgpubsub(project: Path, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args], cwd=project, env=env(dsn), capture_output=True, text=True, timeout=60
    )


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    return out.stdout


def fails(out: subprocess.CompletedProcess[str], code: int, *says: str) -> None:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    for text in says:
        assert text in out.stderr, out.stderr


def test_the_api_takes_status_any_like_the_cli(dsn: str) -> None:
    migrate(dsn)
    admin_query(
        dsn,
        "INSERT INTO pgpubsub.message (channel, payload, status) VALUES "
        "('a', '{}', 'dead'), ('a', '{}', 'pending'), ('a', '{}', 'done'), ('b', '{}', 'spill')",
    )
    with psycopg.connect(dsn) as conn:
        assert len(messages.list_messages(conn, status="any")) == 4
        assert len(messages.list_messages(conn, status="any", channel="a")) == 3
        assert messages.count(conn, "any") == 4
        assert len(messages.replay(conn, channel="a", status="any").replayed) == 2
        assert messages.purge(conn, status="any", channel="a") == 3
        assert messages.purge(conn, status="any") == 1


def test_every_messages_option_of_the_cli_is_a_keyword_of_the_api() -> None:
    """Same name, and the same values (``--status any``), in pgpubsub.messages."""
    parser = cli.parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    per_command = sub.choices  # type: ignore[attr-defined]
    shared = {"dsn", "log_level", "log_format", "debug", "help"}
    msgs = {a.dest for a in per_command["messages"]._actions} - shared
    api = {
        "list": messages.list_messages,
        "replay": messages.replay,
        "purge": messages.purge,
        "cancel": messages.cancel,
    }
    keywords = set().union(*(inspect.signature(f).parameters for f in api.values()))
    # The action is the function; --dry-run is messages.count; --yes asks nothing in Python.
    assert msgs - {"action", "dry_run", "yes"} <= keywords
    publish = {a.dest for a in per_command["publish"]._actions} - shared
    # --plain chooses NOTIFY over an unknown name: no publishing option
    assert publish - {"channel", "payload", "plain"} == set(Options.__dataclass_fields__)


def test_a_project_from_its_own_folder(project: Path, dsn: str) -> None:
    """migrate, publish, listen, messages: the working directory is importable, and the
    channel goes by its path or its name wherever it is typed."""
    assert "schema is up to date" in ok(pgpubsub(project, dsn, "migrate", "myapp.tasks"))
    said = ok(pgpubsub(project, dsn, "publish", "myapp.tasks.SendEmail", '{"to": "nobody"}'))
    assert said == "stored message 1 on durable channel 'emails' (myapp.tasks.SendEmail)\n"
    said = ok(pgpubsub(project, dsn, "publish", "emails", '{"to": "a"}', "--dedupe-key", "a"))
    assert said == "stored message 2 on durable channel 'emails'\n"
    assert admin_query(dsn, "SELECT dedupe_key FROM pgpubsub.message WHERE id = 2") == [("a",)]
    for given in ("emails", "myapp.tasks.SendEmail"):
        out = pgpubsub(project, dsn, "messages", "list", "--status", "any", "--channel", given)
        listed = ok(out)
        assert [line.split("\t")[0] for line in listed.splitlines()[1:]] == ["1", "2"], listed
    worker = subprocess.Popen(
        [SCRIPT, "listen", "myapp.tasks", "--channels", "emails", "--worker"],
        cwd=project,
        env=env(dsn),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            # Done messages are deleted (no retention): message 2 is gone.
            lambda: admin_query(dsn, "SELECT id, status FROM pgpubsub.message") == [(1, "dead")],
            timeout=30,
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    shown = ok(pgpubsub(project, dsn, "messages", "show", "1"))
    lines = shown.splitlines()
    assert "    Traceback (most recent call last):" in lines, shown
    assert "    LookupError: no mailbox for 'nobody'" in lines, shown
    assert '"to": "nobody"' in shown and "\\n" not in shown


def test_unknown_channels_and_modules_are_errors(project: Path, dsn: str) -> None:
    ok(pgpubsub(project, dsn, "migrate", "myapp.tasks"))
    for given in ("nosuch", "myapp.tasks.Nosuch"):
        out = pgpubsub(project, dsn, "messages", "list", "--channel", given)
        fails(out, 6, "no channel")
    fails(pgpubsub(project, dsn, "listen"), 2, "say what to run")
    fails(pgpubsub(project, dsn, "listen", "myapp.nosuch"), 6, "cannot import 'myapp.nosuch'")
    fails(pgpubsub(project, dsn, "listen", "myapp.tasks", "--channels", "nosuch"), 6, "nosuch")
    out = pgpubsub(project, dsn, "publish", "myapp.tasks.SendEmail", '{"too": 1}')
    fails(out, 6, "myapp.tasks.SendEmail", "too")
    out = pgpubsub(project, dsn, "publish", "fresh", '{"a": 1}', "--delay", "5")
    fails(out, 6, "--delay need a durable channel")


def test_publish_on_a_plain_channel_name_is_a_notify(project: Path, dsn: str) -> None:
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('LISTEN "cache.flush"')
        unknown = pgpubsub(project, dsn, "publish", "cache.flush", '{"key": "users"}')
        assert unknown.returncode != 0 and "--plain" in unknown.stderr  # never a silent NOTIFY
        said = ok(pgpubsub(project, dsn, "publish", "cache.flush", '{"key": "users"}', "--plain"))
        assert said.startswith("sent on plain channel 'cache.flush'")
        (note,) = list(conn.notifies(timeout=10, stop_after=1))
    assert (note.channel, note.payload) == ("cache.flush", '{"key":"users"}')


def test_dashboard_on_a_taken_port_says_so(project: Path, dsn: str) -> None:
    migrate(dsn)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        out = pgpubsub(project, dsn, "dashboard", "--port", port)
    fails(out, 6, f"port {port} on 127.0.0.1 is taken", "--port")
    assert "http://" not in out.stdout  # no URL announced for a server that never ran


def test_dashboard_serves_on_the_port_it_announces(project: Path, dsn: str) -> None:
    migrate(dsn)
    server = subprocess.Popen(
        [SCRIPT, "dashboard", "--port", "0"],
        cwd=project,
        env=env(dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[3]
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as page:
                    assert page.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)


def test_bad_publish_input_and_option_values_are_one_line_errors(project: Path, dsn: str) -> None:
    """From the hostile review: nothing stored that a worker would kill at once, no traceback."""
    migrate(dsn)
    for args in (
        ("publish", "myapp.tasks.SendEmail", '{"to": 1}'),  # the wrong type for a field
        ("publish", "myapp.tasks.SendEmail", '{"to": NaN}'),  # not JSON
        ("publish", "myapp.tasks.SendEmail", "Infinity"),
        ("dashboard", "--port", "70000"),
        ("listen", "myapp.tasks", "--worker", "--health-port", "-1"),
        ("listen", "myapp.tasks", "--worker", "--grace", "-1"),
        ("messages", "purge", "--older-than", "-5", "--dry-run"),
        ("messages", "purge", "--older-than", "nan", "--dry-run"),
    ):
        out = pgpubsub(project, dsn, *args)
        assert out.returncode not in (0, 1), (args, out.returncode, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 3, args
    assert admin_query(dsn, "SELECT count(*) FROM pgpubsub.message") == [(0,)]
