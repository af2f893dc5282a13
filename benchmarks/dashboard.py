"""Dashboard page loads with a large ``pgpubsub.message`` (target: under 200 ms).

    python -m pip install -e '.[bench,dashboard]'
    python benchmarks/dashboard.py [--rows 1000000] [--loads 20]

Uses ``$PGPUBSUB_DSN`` (its pgpubsub.message is emptied!) or starts an
embedded server. Fills the table with ``--rows`` messages over 12 channels
(60% done, kept for retention; 30% pending, a third of them delayed; 10%
dead), registers 8 workers, starts ``pgpubsub dashboard`` as a process and
times full page loads over HTTP (median and worst of ``--loads``, after one
warm-up): the overview, a channel's dead and pending tabs, a message, the
workers. For comparison it times, in the same run, the exact per-channel
aggregate that ``pgpubsub status`` runs, which is what the overview would cost
without estimates.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import psycopg

from pgpubsub import health
from pgpubsub.durable import migrate
from pgpubsub.embedded import EmbeddedServer

CHANNELS = [f"channel-{i:02d}" for i in range(12)]
TARGET_MS = 200.0

FILL_SQL = """
INSERT INTO pgpubsub.message (channel, payload, status, attempts, run_at, last_error,
    created_at, completed_at)
SELECT (%(channels)s::text[])[1 + i %% %(n_channels)s],
    pg_catalog.format('{"order_id": %%s, "lines": [1, 2, 3], "note": "benchmark"}', i),
    s.status,
    CASE WHEN s.status = 'dead' THEN 5 ELSE 0 END,
    CASE WHEN s.status = 'pending' AND i %% 3 = 0
         THEN pg_catalog.now() + interval '1 hour' ELSE pg_catalog.now() - interval '5 min' END,
    CASE WHEN s.status = 'dead'
         THEN E'Traceback (most recent call last):\\n  File "shop.py", line 9\\nValueError: no' END,
    pg_catalog.now() - interval '10 min',
    CASE WHEN s.status = 'done' THEN pg_catalog.now() END
FROM pg_catalog.generate_series(1, %(rows)s) AS i,
    LATERAL (SELECT CASE WHEN i %% 10 < 6 THEN 'done' WHEN i %% 10 < 9 THEN 'pending'
                         ELSE 'dead' END AS status) s
"""
WORKERS_SQL = """
INSERT INTO pgpubsub.worker (id, host, pid, version, channels, processed, failed, stats)
SELECT 'bench-' || w, 'host-' || (w %% 3), 1000 + w, 'bench', %(channels)s::text[], 1000 * w, w,
    (SELECT pg_catalog.jsonb_object_agg(c, pg_catalog.jsonb_build_object(
        'kind', 'durable', 'durable', true, 'processed', 100 * w, 'failed', 0))
     FROM pg_catalog.unnest(%(channels)s::text[]) c)
FROM pg_catalog.generate_series(1, 8) w
"""


def fill(dsn: str, rows: int) -> None:
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE pgpubsub.message")
        conn.execute("DELETE FROM pgpubsub.worker")
        started = time.perf_counter()
        conn.execute(FILL_SQL, {"channels": CHANNELS, "n_channels": len(CHANNELS), "rows": rows})
        conn.execute(WORKERS_SQL, {"channels": CHANNELS})
        conn.execute("VACUUM ANALYZE pgpubsub.message")
        print(f"filled {rows:,} messages in {time.perf_counter() - started:.1f}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        response.read()
        assert response.status == 200, (url, response.status)
    return (time.perf_counter() - started) * 1000


def exact_counts_ms(dsn: str, loads: int) -> float:
    times = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(max(3, loads // 4)):
            started = time.perf_counter()
            conn.execute(health.COUNTS_SQL).fetchall()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--loads", type=int, default=20)
    args = parser.parse_args()
    server = None
    dsn = os.environ.get("PGPUBSUB_DSN")
    if not dsn:
        server = EmbeddedServer().start()
        dsn = server.conninfo
    try:
        fill(dsn, args.rows)
        with psycopg.connect(dsn) as conn:
            dead_id = conn.execute(
                "SELECT id FROM pgpubsub.message WHERE status = 'dead' LIMIT 1"
            ).fetchone()[0]  # type: ignore[index]
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgpubsub", "dashboard", "--dsn", dsn, "--port", str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            proc.stdout.readline()  # "pgpubsub dashboard on ..."
            base = f"http://127.0.0.1:{port}"
            for _ in range(50):
                try:
                    load(base + "/workers")
                    break
                except OSError:
                    time.sleep(0.1)
            pages = {
                "overview": "/",
                "channel, dead": f"/channel?name={CHANNELS[3]}&status=dead",
                "channel, pending": f"/channel?name={CHANNELS[3]}&status=pending",
                "channel, done": f"/channel?name={CHANNELS[3]}&status=done",
                "message": f"/message/{dead_id}",
                "workers": "/workers",
            }
            print(f"\n{'page':<18} {'median':>9} {'worst':>9}   target {TARGET_MS:.0f} ms")
            for name, path in pages.items():
                load(base + path)  # warm-up
                times = [load(base + path) for _ in range(args.loads)]
                median, worst = statistics.median(times), max(times)
                verdict = "ok" if median < TARGET_MS else "SLOW"
                print(f"{name:<18} {median:>7.1f}ms {worst:>7.1f}ms   {verdict}")
            exact = exact_counts_ms(dsn, args.loads)
            print(
                f"\nthe exact per-channel aggregate (pgpubsub status) on the same table: "
                f"{exact:.0f} ms per run, what every overview refresh would cost without "
                "estimates"
            )
        finally:
            proc.terminate()
            proc.wait()
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
