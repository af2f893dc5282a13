"""Operating pgpubsub: the CLI's failures, `status`, the worker registry, metrics, logs, tracing.

The command runs as a subprocess, the way an operator or a probe runs it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from helpers import Running, admin_query, install_version_5, wait_until

import pgpubsub
from pgpubsub.channel import spec_of
from pgpubsub.durable import migrate
from pgpubsub.errors import ConfigurationError

pytestmark = pytest.mark.acceptance

TESTS = Path(__file__).parent
JOBS = "app.channels.Jobs"  # the channel name of app.channels.Jobs
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "PGPUBSUB_DSN"}
    return {**base, "PYTHONPATH": str(TESTS), **extra}


def run(*args: str, stdin: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgpubsub", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(**extra),
        input=stdin,
    )


def one_failure(out: subprocess.CompletedProcess[str], code: int, *says: str) -> None:
    """The documented exit code, one or two lines on stderr, no traceback."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, out.stderr
    for text in says:
        assert text in out.stderr, out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- one-line failures ---------------------------------------------------------------


def test_no_database_says_how_to_give_one() -> None:
    # No --dsn, no PGPUBSUB_DSN; libpq's default socket on a port nobody uses.
    out = run("messages", "list", PGPORT="1")
    one_failure(out, 3, "cannot connect to PostgreSQL", "pass --dsn or set PGPUBSUB_DSN")


def test_a_malformed_dsn_is_a_configuration_error() -> None:
    out = run("status", "--dsn", "host=localhost port")
    one_failure(out, 6, "invalid connection settings")


def test_before_migrate_each_command_says_run_migrate(dsn: str) -> None:
    one_failure(run("messages", "list", "--dsn", dsn), 4, "run `pgpubsub migrate`")
    one_failure(run("messages", "show", "1", "--dsn", dsn), 4, "run `pgpubsub migrate`")
    one_failure(run("status", "--dsn", dsn), 4, "not installed", "run `pgpubsub migrate`")


def test_a_durable_worker_without_the_schema_stops_at_once(dsn: str) -> None:
    for mode in ([], ["--worker"]):
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "pgpubsub", "listen", "app.durable_listeners", *mode],
            capture_output=True,
            text=True,
            timeout=60,
            env=env(PGPUBSUB_DSN=dsn),
        )
        assert time.monotonic() - started < 20
        one_failure(out, 4, "schema is not installed", "run `pgpubsub migrate`")


def test_messages_show_list_and_bad_status(dsn: str) -> None:
    migrate(dsn)
    one_failure(run("messages", "show", "999", "--dsn", dsn), 1, "no stored message with id 999")
    listed = run("messages", "list", "--dsn", dsn)
    assert listed.returncode == 0 and listed.stdout == "no dead messages\n"
    out = run("messages", "list", "--status", "failed", "--dsn", dsn)
    one_failure(out, 2, "invalid choice: 'failed'", "--help")


def _dead_and_pending(dsn: str) -> None:
    migrate(dsn)
    admin_query(
        dsn,
        "INSERT INTO pgpubsub.message (channel, payload, status) "
        "VALUES ('a', '{}', 'dead'), ('b', '{}', 'dead'), ('a', '{}', 'pending')",
    )


def test_destructive_commands_need_yes_off_a_terminal_and_offer_dry_run(dsn: str) -> None:
    _dead_and_pending(dsn)
    count = "SELECT status, count(*) FROM pgpubsub.message GROUP BY 1 ORDER BY 1"
    before = admin_query(dsn, count)
    refused = run("messages", "purge", "--status", "pending", "--dsn", dsn, stdin="")
    one_failure(refused, 2, "refusing to delete 1 pending message(s)", "--yes")
    one_failure(run("messages", "replay", "--dsn", dsn, stdin=""), 2, "refusing to replay all 2")
    dry = run("messages", "purge", "--status", "any", "--dry-run", "--dsn", dsn)
    assert dry.returncode == 0 and dry.stdout == "would purge 3 message(s)\n"
    dry = run("messages", "replay", "--dry-run", "--dsn", dsn)
    assert dry.returncode == 0 and dry.stdout == "would replay 2 message(s)\n"
    assert admin_query(dsn, count) == before  # nothing changed
    # A filter is not "everything": replaying one channel needs no --yes.
    assert run("messages", "replay", "--channel", "b", "--dsn", dsn).stdout == (
        "replayed 1 message(s)\n"
    )
    done = run("messages", "purge", "--status", "dead", "--yes", "--dsn", dsn)
    assert done.returncode == 0 and done.stdout == "purged 1 message(s)\n"
    assert admin_query(dsn, count) == [("pending", 2)]


def test_channels_option_does_not_swallow_the_module(dsn: str) -> None:
    """`--channels X module` (the module last, as the usage line shows) runs X's listeners."""
    admin_query(dsn, "CREATE TABLE effects (kind text, n int, pid int)")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgpubsub",
            "listen",
            "--channels",
            "app.channels.Created",
            "app.listeners",
            "--worker",
        ],
        env=env(PGPUBSUB_DSN=dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:

            def handled() -> bool:
                pgpubsub.notify("app.channels.Created", conn=conn, n=7)
                return bool(admin_query(dsn, "SELECT count(*) FROM effects")[0][0])

            wait_until(handled, timeout=20, interval=0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out


def test_version_help_and_examples() -> None:
    version = run("--version")
    assert version.returncode == 0 and re.fullmatch(r"pgpubsub \S+\n", version.stdout)
    for command in ("listen", "status", "messages", "migrate", "grant", "demo"):
        out = run(command, "--help")
        assert out.returncode == 0 and "examples:" in out.stdout, command
    listen = run("listen", "--help").stdout
    for option in ("--processes", "--log-level", "--worker", "--metrics-port", "--grace"):
        assert option in listen
    assert "==SUPPRESS==" not in listen


# -- status ------------------------------------------------------------------------


def test_status_check_healthy_missing_schema_unreachable_and_lagging(dsn: str) -> None:
    one_failure(run("status", "--check", "--dsn", dsn), 4, "run `pgpubsub migrate`")
    one_failure(
        run("status", "--check", "--dsn", f"host=127.0.0.1 port={free_port()}"),
        3,
        "database unreachable",
    )
    migrate(dsn)
    ok = run("status", "--check", "--max-age", "60", "--dsn", dsn)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "ok\n", "")
    admin_query(
        dsn,
        "INSERT INTO pgpubsub.message (channel, payload, run_at) "
        "VALUES ('late', '{}', now() - interval '10 minutes')",
    )
    late_run = run("status", "--check", "--max-age", "60", "--dsn", dsn)
    one_failure(late_run, 1, "late: the oldest due message has waited 6")
    # 600 s, and the seconds the command took to start on a busy machine.
    assert re.search(r"has waited 6[0-9][0-9]s", late_run.stderr), late_run.stderr
    health = pgpubsub.status(dsn)
    (late,) = health.channels
    assert (late.channel, late.pending, late.due, late.dead) == ("late", 1, 1, 0)
    assert 590 < (late.oldest_due_age or 0) < 700


def test_status_reports_an_outdated_schema(dsn: str) -> None:
    migrate(dsn)
    admin_query(dsn, "UPDATE pgpubsub.version SET version = 1")
    one_failure(run("status", "--dsn", dsn), 4, "version 1", "run `pgpubsub migrate`")
    migrate(dsn)  # never lowers, always raises to the library's version
    assert pgpubsub.status(dsn).schema_current


def test_status_lists_live_workers_across_processes_and_drops_stopped_ones(dsn: str) -> None:
    migrate(dsn)
    admin_query(dsn, "CREATE TABLE effects (kind text, n int, pid int)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpubsub", "listen", "app.durable_listeners", "--processes", "2"],
        env=env(PGPUBSUB_DSN=dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: len(pgpubsub.status(dsn).workers) == 2, timeout=30, interval=0.2)
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgpubsub.notify_many("app.channels.Jobs", [{"n": i} for i in range(10)], conn=conn)
        wait_until(
            lambda: sum(w.processed for w in pgpubsub.status(dsn).workers) == 10,
            timeout=30,
            interval=0.2,
        )
        out = run("status", "--json", "--dsn", dsn)
        data = json.loads(out.stdout)
        assert out.returncode == 0 and data["problems"] == []
        workers = data["workers"]
        assert [w["alive"] for w in workers] == [True, True]
        assert {w["pid"] for w in workers} == {
            int(p)
            for p in subprocess.check_output(
                ["ps", "-o", "pid=", "--ppid", str(proc.pid)], text=True
            ).split()
        }
        assert all(w["channels"] == [JOBS] for w in workers)
        text = run("status", "--dsn", dsn).stdout
        assert "workers   2 live" in text and JOBS in text
        # A worker whose heartbeat stopped long ago is shown as gone.
        admin_query(
            dsn,
            "UPDATE pgpubsub.worker SET last_seen = now() - interval '1 hour' "
            "WHERE pid = (SELECT min(pid) FROM pgpubsub.worker)",
        )
        assert sorted(w.alive for w in pgpubsub.status(dsn).workers) == [False, True]
    finally:
        proc.send_signal(signal.SIGTERM)
        out_text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out_text
    # A clean stop removes the rows: only the one we aged remains until it is refreshed.
    assert len(pgpubsub.status(dsn).workers) <= 1


# -- metrics -----------------------------------------------------------------------


def _samples(text: str, name: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            found[key] = float(value)
    return found


def test_metrics_of_two_worker_processes_on_one_port(dsn: str) -> None:
    pytest.importorskip("prometheus_client")
    migrate(dsn)
    admin_query(dsn, "CREATE TABLE effects (kind text, n int, pid int)")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgpubsub",
            "listen",
            "app.durable_listeners",
            "--processes",
            "2",
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
        ],
        env=env(PGPUBSUB_DSN=dsn, RANDOM_DELAY="0.002"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    try:
        wait_until(lambda: len(pgpubsub.status(dsn).workers) == 2, timeout=30, interval=0.2)
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgpubsub.notify_many("app.channels.Jobs", [{"n": i} for i in range(400)], conn=conn)
        wait_until(
            lambda: admin_query(dsn, "SELECT count(*) FROM effects")[0][0] == 400, timeout=60
        )
        both = admin_query(dsn, "SELECT count(DISTINCT pid) FROM effects")[0][0]
        key = 'pgpubsub_messages_processed_total{channel="app.channels.Jobs"}'
        wait_until(
            lambda: _samples(scrape(), "pgpubsub_messages_processed_total").get(key) == 400,
            timeout=10,
            interval=0.3,
        )
        text = scrape()
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert both == 2  # the sum really is over two processes
    assert (
        _samples(text, "pgpubsub_messages_delivered_total")[
            'pgpubsub_messages_delivered_total{channel="app.channels.Jobs"}'
        ]
        == 400
    )
    assert (
        _samples(text, "pgpubsub_handler_duration_seconds_count")[
            'pgpubsub_handler_duration_seconds_count{channel="app.channels.Jobs"}'
        ]
        == 400
    )
    assert sum(_samples(text, "pgpubsub_claim_batch_size_sum").values()) == 400
    assert _samples(text, "pgpubsub_database_up") == {"pgpubsub_database_up": 1.0}
    depth = _samples(text, "pgpubsub_queue_depth")
    assert depth['pgpubsub_queue_depth{channel="app.channels.Jobs",due="true"}'] == 0
    assert 'pgpubsub_lag_seconds{channel="app.channels.Jobs"}' in _samples(
        text, "pgpubsub_lag_seconds"
    )


def _other_local_address() -> str | None:
    """An address of this machine that is not loopback (None when it has only loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: picks the outgoing interface, sends nothing
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_metrics_port_alone_serves_on_loopback_only(dsn: str) -> None:
    """``--metrics-port`` without ``--metrics-host``: the metrics are on 127.0.0.1, and only
    there (they name channels and queue depths: another interface is an explicit choice)."""
    pytest.importorskip("prometheus_client")
    migrate(dsn)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpubsub", "listen", "app.durable_listeners", "--worker",
         "--metrics-port", str(port)],
        env=env(PGPUBSUB_DSN=dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def scrape() -> str | None:
        assert proc.poll() is None, f"exited {proc.returncode}: {proc.communicate()[0]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            return None

    other = _other_local_address()
    try:
        wait_until(lambda: scrape() is not None, timeout=30, interval=0.1)
        assert "pgpubsub_queue_depth" in str(scrape())
        if other is not None:  # a machine with only loopback has nothing more to check
            with socket.socket() as s:
                s.settimeout(5)
                assert s.connect_ex((other, port)) != 0, f"metrics reachable on {other}"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out


def test_an_empty_metrics_host_is_a_configuration_error() -> None:
    pytest.importorskip("prometheus_client")
    from pgpubsub import _metrics

    with pytest.raises(ConfigurationError, match="--metrics-host is empty.*0.0.0.0"):
        _metrics.serve(free_port(), "dbname=unused", [], host="")


# -- logs ----------------------------------------------------------------------------


def test_json_logs_iso_times_structured_fields_and_lifecycle(dsn: str) -> None:
    migrate(dsn)
    admin_query(dsn, "CREATE TABLE effects (kind text, n int, pid int)")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgpubsub",
            "listen",
            "app.durable_listeners",
            "--worker",
            "--log-format",
            "json",
        ],
        env=env(PGPUBSUB_DSN=dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: len(pgpubsub.status(dsn).workers) == 1, timeout=30, interval=0.2)
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgpubsub.notify("app.channels.Jobs", conn=conn, n="not a number")
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    records = [json.loads(line) for line in out.splitlines()]
    assert records and all(ISO_UTC.match(r["time"]) for r in records), out
    messages = [r["message"] for r in records]
    assert any(m.startswith("worker starting: pgpubsub ") for m in messages)
    assert any(
        m.startswith("worker listening on 1 channel(s): app.channels.Jobs") for m in messages
    )
    assert any(m.startswith("worker draining") for m in messages)
    assert any(m == "worker stopped: 0 message(s) processed, 1 failed" for m in messages)
    dead = [r for r in records if "is not" in r["message"] or "failed" in r["message"]]
    failed = next(r for r in dead if r.get("message_id"))
    assert failed["channel"] == JOBS and failed["attempt"] == 1


def test_a_worker_without_the_schema_warns_in_lines_that_back_off(dsn: str) -> None:
    """A schema dropped under a running worker: a few one-line warnings, no traceback storm."""
    migrate(dsn)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpubsub", "listen", "app.durable_listeners", "--worker"],
        env=env(PGPUBSUB_DSN=dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: len(pgpubsub.status(dsn).workers) == 1, timeout=30, interval=0.2)
    admin_query(dsn, "DROP SCHEMA pgpubsub CASCADE")
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    warnings = [line for line in out.splitlines() if "run `pgpubsub migrate`" in line]
    assert 1 <= len(warnings) <= 6, out


# -- tracing -------------------------------------------------------------------------


def test_a_durable_message_is_processed_in_its_publishers_trace(dsn: str) -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from pgpubsub.listen import Registry

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkey = pytest.MonkeyPatch()
    monkey.setattr(trace, "get_tracer_provider", lambda: provider)
    try:
        migrate(dsn)
        from app.channels import Jobs

        seen: list[int] = []
        registry = Registry()
        registry.add(Jobs, lambda n: seen.append(n))
        tracer = provider.get_tracer("the-app")
        with tracer.start_as_current_span("checkout") as parent, psycopg.connect(dsn) as conn:
            pgpubsub.notify(Jobs, conn=conn, n=5)
            conn.commit()
        assert pgpubsub.process_stored_notifications([Jobs], dsn=dsn, registry=registry) == 1
    finally:
        monkey.undo()
    assert seen == [5]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    publish, process = spans[f"publish {JOBS}"], spans[f"process {JOBS}"]
    trace_id = parent.get_span_context().trace_id
    assert publish.context.trace_id == process.context.trace_id == trace_id
    assert publish.kind == trace.SpanKind.PRODUCER and process.kind == trace.SpanKind.CONSUMER
    assert process.parent.span_id == publish.context.span_id
    assert [link.context.span_id for link in process.links] == [publish.context.span_id]
    assert process.attributes["messaging.destination.name"] == JOBS


# -- upgrading ---------------------------------------------------------------------


def _schema_v1(dsn: str) -> None:
    """The schema as version 1 left it: no version, registry or schedule, no new columns
    (the plain table of versions 1 to 5)."""
    install_version_5(dsn)
    admin_query(
        dsn,
        "DROP TABLE pgpubsub.version, pgpubsub.worker, pgpubsub.schedule;"
        "ALTER TABLE pgpubsub.message DROP COLUMN trace, DROP COLUMN priority,"
        " DROP COLUMN dedupe_key, DROP COLUMN ordering_key",
    )


def test_upgrading_a_version_1_schema_keeps_rows_and_publishers(dsn: str) -> None:
    from app.channels import Jobs

    _schema_v1(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        kept = pgpubsub.notify(Jobs, conn=conn, n=1)  # plain publishing works before migrate
        with pytest.raises(pgpubsub.SchemaMissing, match="run `pgpubsub migrate`"):
            pgpubsub.notify(Jobs(n=2), conn=conn, delay=5)
    one_failure(run("status", "--dsn", dsn), 4, "version 1", "run `pgpubsub migrate`")
    out = subprocess.run(
        [sys.executable, "-m", "pgpubsub", "listen", "app.durable_listeners", "--worker"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(PGPUBSUB_DSN=dsn),
    )
    one_failure(out, 4, "version 1", "run `pgpubsub migrate`")
    assert run("migrate", "--dsn", dsn).returncode == 0
    assert pgpubsub.status(dsn).schema_current
    assert admin_query(dsn, "SELECT id, priority, dedupe_key FROM pgpubsub.message") == [
        (kept, 0, None)
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert pgpubsub.notify(Jobs(n=2), conn=conn, delay=5, dedupe_key="two") > kept


def test_upgrading_a_version_2_schema_and_per_channel_counts_in_the_registry(dsn: str) -> None:
    from app.channels import Jobs, Reads

    from pgpubsub.listen import Registry

    migrate(dsn)
    admin_query(
        dsn,
        "ALTER TABLE pgpubsub.worker DROP COLUMN stats; DROP INDEX pgpubsub.message_dead_idx;"
        "DROP STATISTICS pgpubsub.message_kept_channel_status;"
        "UPDATE pgpubsub.version SET version = 2",
    )
    one_failure(run("status", "--dsn", dsn), 4, "version 2", "run `pgpubsub migrate`")
    seen: list[int] = []
    registry = Registry()
    registry.add(Reads, lambda model_id, model_type, date: seen.append(model_id))
    # A worker of plain channels runs on the old schema, and registers without its counts.
    worker = Running(dsn, registry, channels=[spec_of(Reads)])
    try:
        wait_until(lambda: len(pgpubsub.status(dsn).workers) == 1)
    finally:
        worker.stop()
    assert run("migrate", "--dsn", dsn).returncode == 0
    assert pgpubsub.status(dsn).schema_current
    registry.add(Jobs, lambda n: None)
    worker = Running(dsn, registry, channels=[spec_of(Reads), spec_of(Jobs)])
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgpubsub.notify(Reads, conn=conn, model_id=1, model_type="Post")
            pgpubsub.notify_many(Jobs, [{"n": i} for i in range(3)], conn=conn)

        def stats() -> object:
            # The worker's row appears with its first heartbeat, a moment after it listens.
            return [row[0] for row in admin_query(dsn, "SELECT stats FROM pgpubsub.worker")]

        expected = {
            spec_of(Reads).name: {"kind": "plain", "durable": False, "processed": 1, "failed": 0},
            JOBS: {"kind": "durable", "durable": True, "processed": 3, "failed": 0},
        }
        wait_until(lambda: stats() == [expected], timeout=20, interval=0.2)
    finally:
        worker.stop()
