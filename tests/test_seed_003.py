"""The pgpubsub 0.0.5 README examples (seed 003), run as written.

The only change is Python 3's ``print(e.payload)`` for the README's Python 2
``print e.payload``. Connection parameters come from libpq's environment, as
they would for a reader with a local server.
"""

from __future__ import annotations

import os
import pickle
import threading
from typing import Any

import pytest
from helpers import admin_query
from psycopg.conninfo import conninfo_to_dict

import pgpubsub


def test_readme_connect_notify_listen(libpq_env: str) -> None:
    pubsub = pgpubsub.connect(user="postgres", database="test")
    pubsub.notify("test_channel", "some message")
    pubsub.listen("test")
    pubsub.listen("chan1")
    pubsub.listen("chan2")
    pubsub.notify("chan2", "via chan2")
    for e in pubsub.events():
        print(e.payload)
        assert e.payload == "via chan2"
        break
    pubsub.unlisten("channel2")
    pubsub.close()


def test_readme_get_event_session(libpq_env: str) -> None:
    pubsub = pgpubsub.connect(user="postgres", database="test")
    pubsub.listen("test")
    assert pubsub.get_event() is None  # Nothing delivered yet, so returns None
    pubsub.notify("test", "message 1")
    pubsub.notify("test", "message 2")
    pid = pubsub.conn.get_backend_pid()
    assert repr(pubsub.get_event()) == f"Notify({pid}, 'test', 'message 1')"
    assert repr(pubsub.get_event()) == f"Notify({pid}, 'test', 'message 2')"
    assert pubsub.get_event() is None  # No more messages, so returns None
    pubsub.close()


def test_readme_yield_timeouts(libpq_env: str) -> None:
    pubsub = pgpubsub.connect(user="postgres", database="test")
    pubsub.listen("ws")
    pings, messages = [], []

    def send_websocket_ping() -> None:
        pings.append(1)

    def send_websocket_message(payload: str) -> None:
        messages.append(payload)

    for e in pubsub.events(select_timeout=0.05, yield_timeouts=True):
        if e is None:
            send_websocket_ping()
            if len(pings) == 2:
                pubsub.notify("ws", "hi")
        else:
            send_websocket_message(e.payload)
            break
    assert len(pings) == 2 and messages == ["hi"]


def test_readme_echo_filters_its_own_pid(libpq_env: str) -> None:
    pubsub = pgpubsub.connect(user="postgres", database="test")
    my_pid = pubsub.conn.get_backend_pid()
    pubsub.listen("echo")
    echoed = threading.Event()

    def echo_loop() -> None:
        try:
            for e in pubsub.events(select_timeout=0.1):
                sender_pid = e.pid
                if sender_pid != my_pid:
                    pubsub.notify("echo", e.payload)
                    echoed.set()
        except pgpubsub.ConnectionLost:
            pass

    thread = threading.Thread(target=echo_loop)
    thread.start()
    other = pgpubsub.connect(user="postgres", database="test")
    other.listen("echo")
    other.notify("echo", "ping")
    received = []
    for e in other.events(select_timeout=2, yield_timeouts=True):
        if e is None:
            break
        received.append((e.pid, e.payload))
    assert received == [(other.conn.get_backend_pid(), "ping"), (my_pid, "ping")]
    assert echoed.is_set()
    admin_query(libpq_env, "SELECT pg_terminate_backend(%s)", (my_pid,))
    thread.join(5)
    assert not thread.is_alive()
    other.close()


def test_readme_unsafe_name_is_harmless(libpq_env: str) -> None:
    pubsub = pgpubsub.connect(user="postgres", database="test")
    pubsub.conn.execute("CREATE TABLE users (id int)")
    channel = "events_" + "; DROP TABLE users;"
    pubsub.listen(channel)
    pubsub.notify(channel, "x")
    assert pubsub.get_event().payload == "x"
    assert pubsub.conn.execute("SELECT to_regclass('users') IS NOT NULL").fetchone() == (True,)
    pubsub.close()


def test_connect_takes_what_psycopg2_connect_takes(dsn: str, monkeypatch: Any) -> None:
    """``connect(dsn=...)`` and keywords, ints and psycopg2's None factories included."""
    monkeypatch.setenv("DATABASE_URL", dsn)
    by_dsn = pgpubsub.connect(dsn=os.environ["DATABASE_URL"])
    params = conninfo_to_dict(dsn)
    by_keywords = pgpubsub.connect(
        host=params["host"],
        port=int(params["port"]),
        user=params["user"],
        password=params.get("password", "unused"),
        dbname=params["dbname"],
        connection_factory=None,
        cursor_factory=None,
    )
    by_keywords.listen("psycopg2_style")
    by_dsn.notify("psycopg2_style", "over dsn=")
    event = next(by_keywords.events(select_timeout=5))
    assert (event.pid, event.channel, event.payload) == (
        by_dsn.conn.get_backend_pid(),
        "psycopg2_style",
        "over dsn=",
    )
    by_dsn.close()
    by_keywords.close()


def test_connect_refuses_what_it_cannot_honour(dsn: str) -> None:
    with pytest.raises(pgpubsub.ConfigurationError, match="connection_factory"):
        pgpubsub.connect(dsn=dsn, connection_factory=object)
    with pytest.raises(pgpubsub.ConfigurationError, match="once"):
        pgpubsub.connect(dsn, dsn=dsn)


def test_events_are_psycopg2_notifies(libpq_env: str) -> None:
    """As psycopg2's Notify: attributes pid/channel/payload, and the tuple (pid, channel)."""
    pubsub = pgpubsub.connect(user="postgres", database="test")
    pubsub.listen("test")
    pubsub.notify("test", "message 1")
    pid = pubsub.conn.get_backend_pid()
    e = pubsub.get_event()
    assert (e.pid, e.channel, e.payload) == (pid, "test", "message 1")
    assert e[0] == pid and e[1] == "test" and e[-1] == "test" and len(e) == 2
    assert e == (pid, "test") and tuple(e) == (pid, "test")
    sender, channel = e
    assert (sender, channel) == (pid, "test")
    with pytest.raises(IndexError):
        e[2]
    assert e == pgpubsub.Notify(pid, "test", "message 1")
    assert e != pgpubsub.Notify(pid, "test", "message 2")
    copied = pickle.loads(pickle.dumps(e))
    assert copied == e and copied.payload == "message 1"
    assert pgpubsub.Notify(pid, "test") == (pid, "test")
    assert hash(pgpubsub.Notify(pid, "test")) == hash((pid, "test"))
    pubsub.close()
