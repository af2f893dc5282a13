"""Workers started while the database is down (a deploy during a failover): chaos tier."""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
from helpers import admin_query, wait_until
from test_cli import Listen, alive

import pgpubsub
from pgpubsub import durable
from pgpubsub.embedded import EmbeddedServer

pytestmark = pytest.mark.chaos

OUTAGE = 12.0  # seconds the database stays down after the workers start (a failover)


def test_listen_started_during_an_outage_waits_and_then_processes_everything() -> None:
    with EmbeddedServer(prepare=True) as server:
        dsn = server.conninfo
        durable.migrate(dsn)
        admin_query(dsn, "CREATE TABLE effects (kind text, n int, pid int)")
        with psycopg.connect(dsn) as conn:
            pgpubsub.notify_many(
                "app.channels.Jobs", [{"n": i, "blob": ""} for i in range(1000)], conn=conn
            )
        server.stop()
        started = time.monotonic()
        run = Listen(
            dsn, "app.durable_listeners", "--channels", "app.channels.Jobs", "--processes", "2"
        )
        try:
            wait_until(lambda: len(run.workers()) == 2, timeout=15)
            first = sorted(run.workers())
            # A child killed during the outage is replaced; its sibling is not touched.
            time.sleep(3)
            os.kill(first[0], signal.SIGKILL)
            wait_until(lambda: len(run.workers() - {first[0]}) == 2, timeout=15)
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - started)))
            assert run.proc.poll() is None, run.output()
            assert alive(first[1])
            server.start()
            wait_until(
                lambda: (
                    admin_query(dsn, "SELECT count(DISTINCT n), count(*) FROM effects")
                    == [(1000, 1000)]
                ),
                timeout=60,
                interval=0.2,
            )
            assert admin_query(dsn, "SELECT count(*) FROM pgpubsub.message") == [(0,)]
            assert alive(first[1])
        finally:
            run.proc.send_signal(signal.SIGTERM)
            code = run.proc.wait(30)
        out = run.output()
        assert code == 0, out
        assert "giving up" not in out and "Traceback" not in out
