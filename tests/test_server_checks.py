"""What `pgpubsub status` says about the server: what holds vacuum back, how full the
NOTIFY queue is, and the autovacuum settings `migrate` gives the tables that churn.

A transaction left open anywhere in the database (a report, a session idle in a
transaction, a prepared transaction) keeps every row a worker deleted since it began:
the queue's tables grow and each claim walks more dead index entries. The operator
must learn which session it is, from the tool they already run.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from helpers import admin_query, fast_deadlock_detection, wait_until

import pgpubsub
from pgpubsub import health
from pgpubsub.durable import migrate


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    migrate(dsn)
    yield dsn


def horizon_warnings(dsn: str, age: float) -> list[str]:
    return [w for w in pgpubsub.status(dsn, horizon_age=age).warnings if "vacuum" in w]


def test_status_names_the_session_that_holds_vacuum_back(db: str) -> None:
    assert horizon_warnings(db, 0.2) == []
    with psycopg.connect(db, application_name="nightly-report") as report:
        report.execute("SELECT pg_catalog.txid_current()")  # idle in transaction from here
        pid = report.info.backend_pid
        time.sleep(0.5)
        (warning,) = horizon_warnings(db, 0.2)
        assert f"session {pid}" in warning
        assert "nightly-report" in warning
        assert "idle in transaction" in warning
        # Younger than the threshold: not yet a warning.
        assert horizon_warnings(db, 3600) == []
        cli = subprocess.run(
            [sys.executable, "-m", "pgpubsub", "status", "--horizon-age", "0.2", "--dsn", db],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert f"WARNING   session {pid}" in cli.stdout, cli.stdout
        report.rollback()
    assert horizon_warnings(db, 0.2) == []


def test_status_names_a_prepared_transaction_that_holds_vacuum_back(db: str) -> None:
    (setting,) = admin_query(db, "SELECT current_setting('max_prepared_transactions')::int")
    if setting[0] == 0:
        pytest.skip("the server given by PGPUBSUB_TEST_DSN allows no prepared transactions")
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO pgpubsub.schedule VALUES ('x', now())")
        conn.execute("PREPARE TRANSACTION 'forgotten-by-a-coordinator'")
        try:
            time.sleep(0.5)
            (warning,) = horizon_warnings(db, 0.2)
            assert "prepared transaction 'forgotten-by-a-coordinator'" in warning
        finally:
            conn.execute("ROLLBACK PREPARED 'forgotten-by-a-coordinator'")
    assert horizon_warnings(db, 0.2) == []


def test_status_reports_how_full_the_notify_queue_is(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pgpubsub.status(db).notify_queue_usage == 0
    # A listening session that stays in a transaction reads none of the
    # notifications sent since it began: the queue keeps all of them.
    with psycopg.connect(db) as stuck, psycopg.connect(db) as sender:
        stuck.execute("LISTEN flood")
        stuck.commit()
        stuck.execute("SELECT 1")  # idle in transaction from here
        for _ in range(20):
            sender.execute(
                "SELECT pg_notify('flood', g || repeat('x', 7000)) FROM generate_series(1, 50) g"
            )
            sender.commit()
        usage = pgpubsub.status(db).notify_queue_usage
        assert usage is not None and usage > 0
        monkeypatch.setattr(health, "NOTIFY_QUEUE_WARN", usage / 2)
        (warning,) = [w for w in pgpubsub.status(db).warnings if "NOTIFY queue" in w]
        assert "full" in warning
        monkeypatch.setattr(health, "NOTIFY_QUEUE_WARN", 0.5)
        assert not [w for w in pgpubsub.status(db).warnings if "NOTIFY queue" in w]
    # The queue's tail moves on once the listener is gone.
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SELECT pg_notify('flood', 'x')")
    wait_until(lambda: pgpubsub.status(db).notify_queue_usage == 0, timeout=10, interval=0.1)


def test_migrate_makes_autovacuum_keep_up_with_the_tables_that_churn(db: str) -> None:
    rows = admin_query(
        db,
        "SELECT c.relname, c.reloptions FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'pgpubsub' AND c.relkind = 'r'",
    )
    options = {name: dict(o.split("=") for o in (opts or [])) for name, opts in rows}  # type: ignore[union-attr]
    churning = ("message_0", "message_3", "message_kept", "message_deduped", "lease", "worker")
    for table in (*churning, "rate_bucket", "schedule"):
        assert table in options, sorted(options)
        assert float(options[table]["autovacuum_vacuum_scale_factor"]) <= 0.05, table
        assert float(options[table]["autovacuum_vacuum_cost_delay"]) <= 2, table
    # Idempotent: migrating again changes nothing and fails on nothing.
    migrate(db)
    again = admin_query(
        db, "SELECT reloptions FROM pg_class WHERE oid = 'pgpubsub.message_kept'::regclass"
    )
    assert sorted(again[0][0]) == sorted(  # type: ignore[arg-type]
        f"{k}={v}" for k, v in options["message_kept"].items()
    )


def test_migrate_beside_a_worker_that_read_the_queue_and_then_writes_it_does_not_deadlock(
    db: str,
) -> None:
    """A worker's transaction read pgpubsub.message and then writes it (its claim, then its
    completion) while `migrate` runs again: migrate took a weaker lock first and then the
    table's exclusive lock (an index, then a column), so the two waited for each other and
    PostgreSQL failed one of them."""
    fast_deadlock_detection(db)
    failures: list[BaseException] = []

    def migrate_again() -> None:
        try:
            migrate(db)
        except BaseException as exc:
            failures.append(exc)

    with psycopg.connect(db) as worker:
        worker.execute("SELECT count(*) FROM pgpubsub.message")  # read: it holds the table
        thread = threading.Thread(target=migrate_again)
        thread.start()
        wait_until(
            lambda: admin_query(
                db,
                "SELECT count(*) FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_class c "
                "ON c.oid = l.relation WHERE c.relname = 'message' AND NOT l.granted",
            )[0][0]
            > 0
        )
        worker.execute("UPDATE pgpubsub.message SET attempts = attempts WHERE false")  # writes
        worker.commit()
        thread.join(timeout=30)
    assert failures == []
