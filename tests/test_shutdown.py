"""Stopping `pgpubsub listen` at the awkward moments: a grace period that runs out, a
SIGTERM while the processes still start, a supervisor killed before its workers could
tie themselves to it (issue 23, and what the chaos tier's long run found).

Real processes, real signals; the moments are held open by the test (a listener that
hangs, a module or an interpreter start that waits for a file), not hit by timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import admin_query, wait_until

import pgpubsub
from pgpubsub.durable import migrate

pytestmark = pytest.mark.acceptance

TESTS = Path(__file__).parent
LISTENERS = "app.shutdown_listeners"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def children_of(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


class Listen:
    """``pgpubsub listen app.shutdown_listeners ARGS`` as a subprocess."""

    def __init__(self, dsn: str, *args: str, path: str = str(TESTS), **env: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgpubsub", "listen", LISTENERS, *args],
            env={**os.environ, "PGPUBSUB_DSN": dsn, "PYTHONPATH": path, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        out = self.proc.communicate(timeout=30)[0]
        return self.proc.returncode, out


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    migrate(dsn)
    admin_query(dsn, "CREATE TABLE started (n int, pid int)")
    admin_query(dsn, "CREATE TABLE effects (n int, pid int)")
    yield dsn


def publish(dsn: str, ns: range) -> dict[int, int]:
    """Publish ``Hangs(n)`` for each n, in one transaction: n -> message id."""
    from app.shutdown_channels import Hangs

    with psycopg.connect(dsn) as conn:
        return {n: pgpubsub.notify(Hangs(n=n), conn=conn) for n in ns}


def rows(dsn: str, ids: dict[int, int]) -> dict[int, tuple[object, ...]]:
    """n -> (status, attempts, unfinished) of the published messages."""
    by_id = {i: n for n, i in ids.items()}
    found = admin_query(
        dsn, "SELECT id, status, attempts, unfinished FROM pgpubsub.message WHERE id = ANY(%s)",
        (list(by_id),),
    )  # fmt: skip
    return {by_id[int(str(r[0]))]: tuple(r[1:]) for r in found}


def started(dsn: str) -> int:
    """How often the listener of message 0 (it hangs) started."""
    return int(str(admin_query(dsn, "SELECT count(*) FROM started WHERE n = 0")[0][0]))


# -- a grace period that runs out --------------------------------------------------------


def stop_past_the_grace(dsn: str, how: str, starts: int) -> None:
    """Run until the hanging listener has started ``starts`` times, then SIGTERM; exit 0."""
    args = ["--worker"] if how == "worker" else ["--processes", "1"]
    run = Listen(dsn, *args, "--grace", "0.5")
    try:
        wait_until(lambda: started(dsn) >= starts, timeout=30, interval=0.05)
    except AssertionError:
        run.proc.kill()
        raise AssertionError(run.proc.communicate(timeout=30)[0]) from None
    code, out = run.stop()
    assert code == 0, out


@pytest.mark.parametrize("how", ["worker", "supervisor"])
def test_a_grace_that_runs_out_charges_only_the_message_in_its_listener(
    db: str, how: str
) -> None:
    """The batch in hand is given back uncharged but for the message whose listener runs.

    Message 0 hangs in its listener, first in a batch with four others that no
    listener has started when the grace runs out: those are pending again with
    no attempt spent (not suspected of stopping the process), message 0 keeps
    its attempt and stays suspect.
    """
    ids = publish(db, range(5))
    stop_past_the_grace(db, how, 1)
    state = rows(db, ids)
    assert state[0] == ("pending", 1, True), state
    assert all(state[n] == ("pending", 0, False) for n in range(1, 5)), state


def test_only_the_message_that_hangs_dies_however_often_the_worker_stops(db: str) -> None:
    """Stopped past its grace again and again, a worker kills only the hanging message.

    It dies of its own max_attempts (3) stops; the others complete, each once:
    message 1, which fails its first two runs of its three attempts, too (the
    chaos tier's ``charged-innocent``: an attempt charged by a stop in which it
    never ran would leave it none to succeed in).
    """
    ids = publish(db, range(5))
    for stops in (1, 2, 3):
        stop_past_the_grace(db, "worker", stops)
    run = Listen(db, "--worker", "--grace", "0.5")
    try:
        wait_until(
            lambda: admin_query(
                db, "SELECT count(*) FROM pgpubsub.message WHERE status = 'pending'"
            ) == [(0,)],
            timeout=30,
        )
    finally:
        code, out = run.stop()
    assert code == 0, out
    state = rows(db, ids)
    assert state[0][:2] == ("dead", 3), state
    assert set(state) == {0}, state  # the others completed (and were deleted)
    effects = admin_query(db, "SELECT n FROM effects ORDER BY n")
    assert effects == [(1,), (2,), (3,), (4,)]
    assert started(db) == 3
    assert admin_query(db, "SELECT count(*) FROM started WHERE n = 1") == [(3,)]


# -- a SIGTERM while the processes start ------------------------------------------------


@pytest.mark.parametrize("how", ["supervisor", "worker"])
def test_sigterm_while_importing_the_listeners_exits_0_having_started_nothing(
    db: str, tmp_path: Path, how: str
) -> None:
    """A supervisor (or a lone worker) stopped before it started anything exits 0."""
    hold = tmp_path / "hold"
    args = ["--processes", "2"] if how == "supervisor" else ["--worker"]
    run = Listen(db, *args, HOLD_IMPORT=str(hold), HOLD_IN="supervisor")
    wait_until(lambda: Path(f"{hold}.{run.proc.pid}").exists(), timeout=30)
    run.proc.send_signal(signal.SIGTERM)
    Path(f"{hold}.go").touch()
    out = run.proc.communicate(timeout=30)[0]
    assert run.proc.returncode == 0, out
    assert "started worker" not in out and "worker starting" not in out, out
    assert admin_query(db, "SELECT count(*) FROM pg_stat_activity WHERE application_name "
                           "LIKE 'pgpubsub%%' AND datname = current_database()")[0][0] == 0


@pytest.mark.parametrize("how", ["supervisor", "worker"])
def test_sigterm_while_pgpubsub_itself_imports_exits_0_having_started_nothing(
    db: str, tmp_path: Path, how: str
) -> None:
    """The command notes a SIGTERM from the start of ``import pgpubsub`` on (the chaos
    tier's supervisor SIGTERMed just after its start: it died of the signal there)."""
    hold = tmp_path / "hold"
    args = ["--processes", "2"] if how == "supervisor" else ["--worker"]
    path = os.pathsep.join([str(TESTS / "hold_start"), str(TESTS)])
    run = Listen(
        db, *args, path=path, HOLD_MODULE="pgpubsub._clash", HOLD_MODULE_AT=str(hold)
    )
    wait_until(lambda: Path(f"{hold}.{run.proc.pid}").exists(), timeout=30)
    run.proc.send_signal(signal.SIGTERM)
    Path(f"{hold}.go").touch()
    out = run.proc.communicate(timeout=30)[0]
    assert run.proc.returncode == 0, out
    assert "started worker" not in out and "worker starting" not in out, out


@pytest.mark.parametrize(
    ("orig_argv", "argv", "listen"),
    [
        (["python", "-m", "pgpubsub", "listen", "app"], ["-m", "listen", "app"], True),
        (["python", "-X", "dev", "-m", "pgpubsub", "--log-level", "debug", "listen"], [], True),
        (["python", "/venv/bin/pgpubsub", "listen", "app"], ["/venv/bin/pgpubsub", "listen"], True),
        (["python", "-m", "pgpubsub", "status"], ["-m", "status"], False),
        (["python", "-m", "pytest", "listen"], ["-m", "listen"], False),
        (["python", "/venv/bin/pgpubsub", "status"], ["/venv/bin/pgpubsub", "status"], False),
        (["python", "manage.py", "listen"], ["manage.py", "listen"], False),
        (["python", "-c", "import pgpubsub"], ["-c"], False),
    ],
)
def test_only_the_listen_command_notes_sigterm_from_its_start(
    orig_argv: list[str], argv: list[str], listen: bool
) -> None:
    """A program that imports pgpubsub keeps its SIGTERM handling (this test process too)."""
    from pgpubsub import _startup

    assert _startup.listen_command(orig_argv, argv) is listen
    assert _startup.EARLY is None
    assert signal.getsignal(signal.SIGTERM) is not None


def test_sigterm_while_the_workers_start_stops_them_and_exits_0(db: str, tmp_path: Path) -> None:
    """SIGTERM to a supervisor whose workers are still importing: all gone, exit 0."""
    hold = tmp_path / "hold"
    run = Listen(db, "--processes", "2", HOLD_IMPORT=str(hold), HOLD_IN="worker")
    wait_until(lambda: len(list(tmp_path.glob("hold.*"))) == 2, timeout=30)
    workers = {int(p.name.rsplit(".", 1)[1]) for p in tmp_path.glob("hold.*")}
    run.proc.send_signal(signal.SIGTERM)
    Path(f"{hold}.go").touch()
    out = run.proc.communicate(timeout=30)[0]
    assert run.proc.returncode == 0, out
    wait_until(lambda: not any(alive(p) for p in workers), timeout=10)


# -- a supervisor killed before its workers tied themselves to it ------------------------


def test_a_worker_whose_supervisor_died_while_it_started_stops(db: str, tmp_path: Path) -> None:
    """No orphan: a worker that finds its supervisor gone once it can watch for that stops.

    The worker is held at interpreter start (before any pgpubsub code could
    ask the kernel to signal it when its parent dies); its supervisor is
    SIGKILLed meanwhile.
    """
    hold = tmp_path / "start"
    path = os.pathsep.join([str(TESTS / "hold_start"), str(TESTS)])
    run = Listen(db, "--processes", "1", path=path, HOLD_START=str(hold))
    wait_until(lambda: any(tmp_path.glob("start.*")), timeout=30)
    worker = int(next(tmp_path.glob("start.*")).name.rsplit(".", 1)[1])
    try:
        run.proc.kill()
        run.proc.wait(30)  # (its output stays open in the worker)
        Path(f"{hold}.go").touch()
        wait_until(lambda: not alive(worker), timeout=20, interval=0.05)
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
        run.proc.communicate(timeout=30)
