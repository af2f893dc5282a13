"""The chaos run's record of publishes: the commit order it writes down is the one that happened.

The checker holds each ordering key's completions to the order the publishers
committed, so a recorded order that differs from the server's makes a correct
run fail (seen once in CI: a lane descheduled between its COMMIT and its entry
in the order, while a publisher of the same key committed after it and wrote
its entry first).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from chaos_ops import Concurrent, Msg
from chaos_run import Run
from helpers import Server

pytestmark = pytest.mark.chaos


def test_concurrent_publishers_of_a_key_are_recorded_in_commit_order(
    pg_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Run.create(pg_server, "pgpubsub_chaos_record", tmp_path)
    slow: set[threading.Thread] = set()  # the lane that publishes n=1
    committed = threading.Event()  # n=1 committed on the server
    commit = psycopg.Connection.commit
    publish_one = Run._publish_one

    def delayed_commit(conn: psycopg.Connection[Any]) -> None:
        commit(conn)
        if threading.current_thread() in slow:
            committed.set()
            time.sleep(0.5)  # descheduled between its COMMIT and what follows

    def ordered_publish(self: Run, conn: psycopg.Connection[Any], m: Msg) -> Any:
        if m.n == 1:
            slow.add(threading.current_thread())
        elif m.n == 3:
            assert committed.wait(10)  # n=3 is published after n=1 committed
        return publish_one(self, conn, m)

    monkeypatch.setattr(psycopg.Connection, "commit", delayed_commit)
    monkeypatch.setattr(Run, "_publish_one", ordered_publish)
    try:
        run._do(Concurrent(lanes=((Msg(1, ordering_key="k"),), (Msg(2), Msg(3, ordering_key="k")))))
    finally:
        run.close()
    published = run.record.published
    assert published[1].id < published[3].id  # a key's ids follow its commits
    assert published[1].seq is not None and published[3].seq is not None
    assert published[1].seq < published[3].seq, "n=3 recorded as committed before n=1"
