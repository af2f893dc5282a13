"""pgnotifier's Notifier (seed 002), with only the import line changed, and its fixes."""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import psycopg
import pytest
from helpers import admin_query
from psycopg.conninfo import conninfo_to_dict

from pgpubsub import Notifier


def send(dsn: str, channel: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


class Inbox:
    def __init__(self) -> None:
        self.q: queue.Queue[tuple[Any, ...]] = queue.Queue()

    def __call__(self, *args: Any) -> None:
        self.q.put(args)

    def get(self, timeout: float = 5) -> tuple[Any, ...]:
        return self.q.get(timeout=timeout)

    def empty_after(self, wait: float = 0.3) -> bool:
        time.sleep(wait)
        return self.q.empty()


@pytest.fixture
def conf(dsn: str) -> dict[str, Any]:
    return {
        k: v for k, v in conninfo_to_dict(dsn).items() if k in ("dbname", "user", "host", "port")
    }


def test_readme_usage(conf: dict[str, Any], dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    n = Notifier(conf)
    n.add_channels(["ch1", "ch3"])

    n.subscribe(
        42,
        "ch1",
        lambda id, channel, payload, pid: print(
            "callback id: ", id, ", channel: ", channel, ", payload: ", payload, ", pid: ", pid
        ),
    )

    n.subscribe("an_id", "ch2", lambda *_: print("I'm just going to ignore that."))

    seen = Inbox()

    def do_complex_thing(id, channel, payload, pid):  # type: ignore[no-untyped-def]
        seen(id, channel, payload)
        if isinstance(payload, dict) or type(payload) == dict:  # noqa: E721
            for k, v in payload.items():
                print("doing something with key:", k, "-> val", v)
        else:
            print("payload of type: ", type(payload), "is not what I was expecting!")

    n.subscribe((2, "another_id"), "ch2", do_complex_thing)

    # The README's test notifications, sent from the PostgreSQL end:
    send(dsn, "ch1", '"WARNING: Something really bad happened"')
    send(dsn, "ch1", '{"topic": "abc", "data": "some data", "something": "else"}')
    send(dsn, "ch2", '{"topic": "xyz", "notice": "update", "data": [2, "stuff"]}')
    send(dsn, "ch2", "[1,2,3,4,5]")
    send(dsn, "ch3", "[1,2,3,4,5]")
    assert seen.get() == (
        (2, "another_id"),
        "ch2",
        {"topic": "xyz", "notice": "update", "data": [2, "stuff"]},
    )
    assert seen.get() == ((2, "another_id"), "ch2", [1, 2, 3, 4, 5])
    n.stop()
    out = capsys.readouterr().out
    assert "payload:  WARNING: Something really bad happened" in out
    assert "doing something with key: topic -> val xyz" in out
    assert out.count("I'm just going to ignore that.") == 2
    assert "'topic': 'abc'" in out


def test_payloads_become_values_safely(conf: dict[str, Any], dsn: str) -> None:
    n = Notifier(conf)
    inbox = Inbox()
    n.subscribe("s", "v", inbox)
    cases = {
        "true": True,
        "null": None,
        "false": False,
        "3.5": 3.5,
        "plain text, not a value": "plain text, not a value",
        "{'py': (1, 2)}": {"py": (1, 2)},
        "__import__('os').system('echo pwned')": "__import__('os').system('echo pwned')",
        "[" * 5000: "[" * 5000,
        "it's $$ \\ odd": "it's $$ \\ odd",
    }
    for text in cases:
        send(dsn, "v", text)
    got = [inbox.get()[2] for _ in cases]
    n.stop()
    assert got == list(cases.values())


def test_raising_callback_does_not_stop_delivery(conf: dict[str, Any], dsn: str) -> None:
    n = Notifier(conf)
    inbox = Inbox()

    def bad(*args: Any) -> None:
        raise RuntimeError("subscriber bug")

    n.subscribe("bad", "c", bad)
    n.subscribe("good", "c", inbox)
    for i in range(3):
        send(dsn, "c", str(i))
    assert [inbox.get()[2] for _ in range(3)] == [0, 1, 2]
    assert n.is_running()
    n.stop()


def test_unsubscribe_from_one_channel_keeps_the_others(conf: dict[str, Any], dsn: str) -> None:
    n = Notifier(conf)
    inbox = Inbox()
    n.subscribe("me", "a", inbox)
    n.subscribe("me", "b", inbox)
    n.unsubscribe("me", "a")
    send(dsn, "a", "1")
    send(dsn, "b", "2")
    assert inbox.get()[1:3] == ("b", 2)
    assert inbox.empty_after()
    assert n.subscribers() == {
        "me": {"fn": inbox, "channels": {"b": {"active": True, "mute": False, "sub_mute": False}}}
    }
    n.stop()


def test_mute_and_unmute(conf: dict[str, Any], dsn: str) -> None:
    n = Notifier(conf)
    a, b = Inbox(), Inbox()
    n.subscribe("a", "ch", a)
    n.subscribe("b", "ch", b)
    n.mute_subscriber("a")
    assert n.muted_subscribers() == {"a": ["ch"]}
    send(dsn, "ch", "1")
    assert b.get()[2] == 1 and a.empty_after()
    n.mute_channels("ch")
    assert n.muted_channels() == ["ch"] and n.non_muted_channels() == []
    assert n.channels()["ch"]["active"] is False
    send(dsn, "ch", "2")
    assert b.empty_after()
    n.unmute_channels()
    n.unmute_subscriber("a")
    send(dsn, "ch", "3")
    assert a.get()[2] == 3 and b.get()[2] == 3
    n.stop()


def test_autorun_false_waits_for_restart(conf: dict[str, Any], dsn: str) -> None:
    n = Notifier(conf)
    inbox = Inbox()
    n.start()
    n.subscribe("s", "new", inbox, autorun=False)
    send(dsn, "new", "before restart")
    assert inbox.empty_after()
    n.restart()
    send(dsn, "new", "after restart")
    assert inbox.get()[2] == "after restart"
    n.stop()


def test_is_running_tells_the_truth_and_stop_leaves_no_thread(conf: dict[str, Any]) -> None:
    before = set(threading.enumerate())
    n = Notifier(conf)
    assert not n.is_running()
    n.subscribe(1, "x", lambda *a: None)
    assert n.is_running()
    for _ in range(3):
        n.restart()
    n.stop()
    assert not n.is_running()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) - before == set()


@pytest.mark.chaos
def test_reconnects_after_backend_killed(conf: dict[str, Any], dsn: str) -> None:
    n = Notifier(conf)
    inbox = Inbox()
    gaps: list[object] = []
    n.add_gap_handler(gaps.append)
    n.subscribe(1, "k", inbox)
    admin_query(dsn, "SELECT pg_terminate_backend(%s)", (n.status().backend_pid,))
    deadline = time.monotonic() + 5
    while not (gaps and n.is_running()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    send(dsn, "k", "again")
    assert inbox.get()[2] == "again"
    n.stop()


def test_interpreter_exits_without_stop(dsn: str) -> None:
    script = textwrap.dedent(f"""
        from pgpubsub import Notifier
        n = Notifier({dsn!r})
        n.subscribe(1, "exit", lambda *a: None)
        assert n.is_running()
        print("started")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "started"


def test_introspection_has_pgnotifier_shapes(
    conf: dict[str, Any], dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pgnotifier program that prints and indexes channels() and subscribers()."""
    n = Notifier(conf)
    n.add_channels(["ch1", "ch3"])
    inbox = Inbox()

    def fn(*args: Any) -> None:
        inbox(*args)

    n.subscribe(42, "ch1", fn)
    n.subscribe("an_id", "ch2", fn)
    n.mute_subscriber("an_id", "ch2")
    n.mute_channels("ch3")
    c = n.channels()
    print("channels: ", c)
    s = n.subscribers()
    print("subscribers:", s)
    assert c == {
        "ch1": {"mute": False, "active": True, "subscribers": {42: {"mute": False, "fn": fn}}},
        "ch2": {"mute": False, "active": False, "subscribers": {"an_id": {"mute": True, "fn": fn}}},
        "ch3": {"mute": True, "active": False, "subscribers": {}},
    }
    assert s == {
        42: {"fn": fn, "channels": {"ch1": {"active": True, "mute": False, "sub_mute": False}}},
        "an_id": {
            "fn": fn,
            "channels": {"ch2": {"active": False, "mute": False, "sub_mute": True}},
        },
    }
    for channel, data in c.items():  # as pgnotifier users walk it
        for sub_id, sub in data["subscribers"].items():
            assert s[sub_id]["channels"][channel]["sub_mute"] is sub["mute"]
    out = capsys.readouterr().out
    assert "'ch1': {'mute': False, 'active': True, 'subscribers': {42: {'mute': False" in out

    n.subscribe("an_id", "ch2", fn)  # subscribing again keeps the mute
    assert n.subscribers()["an_id"]["channels"]["ch2"]["sub_mute"] is True
    n.mute_channels([])  # an empty list is ALL, as the documented empty default
    assert sorted(n.muted_channels()) == ["ch1", "ch2", "ch3"]
    n.unmute_channels([])
    assert n.muted_channels() == []
    n.unmute_subscriber("an_id", [])
    send(dsn, "ch2", "b'raw'")
    assert inbox.get()[:3] == ("an_id", "ch2", b"raw")
    n.stop()


def test_string_prefixed_literals_become_values(conf: dict[str, Any], dsn: str) -> None:
    n = Notifier(conf)
    inbox = Inbox()
    n.subscribe("s", "lit", inbox)
    cases = {
        "b'bytes \\x00'": b"bytes \x00",
        'u"unicode"': "unicode",
        "r'\\d+'": "\\d+",
        "Rb'\\n'": b"\\n",
        "[b'a', u'b', r'c']": [b"a", "b", "c"],
        "f\"{__import__('os').getpid()}\"": "f\"{__import__('os').getpid()}\"",
        "bogus": "bogus",
        "r" + "(" * 300: "r" + "(" * 300,
    }
    for text in cases:
        send(dsn, "lit", text)
    got = [inbox.get()[2] for _ in cases]
    n.stop()
    assert got == list(cases.values())
