"""The asyncio guide's tutorial, step by step, from an empty folder (docs/guides/asyncio.md).

The service's files (``tests/asyncio_tutorial/``, which the guide includes) are
copied into a new folder; then, as the guide says: ``pgpubsub migrate``, the web
service under uvicorn, the worker (``pgpubsub listen service.tasks``), a signup
posted, and its welcome seen as sent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import wait_until

pytestmark = pytest.mark.acceptance

TUTORIAL = Path(__file__).parent / "asyncio_tutorial"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_asyncio_guide_from_an_empty_folder(dsn: str, tmp_path: Path) -> None:
    shutil.copytree(TUTORIAL / "service", tmp_path / "service")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PGPUBSUB_DSN"] = dsn
    migrate = subprocess.run(
        [BIN / "pgpubsub", "migrate"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert migrate.returncode == 0, migrate.stderr
    port = free_port()
    web = subprocess.Popen(
        [BIN / "uvicorn", "service.app:app", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = subprocess.Popen(
        [BIN / "pgpubsub", "listen", "service.tasks"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> dict[str, object] | None:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]
        except OSError:
            return None

    try:
        wait_until(lambda: _up(port), timeout=30, interval=0.1)
        request = urllib.request.Request(
            base + "/signups",
            data=json.dumps({"email": "ada@example.com"}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 201
        wait_until(
            lambda: get("/signups/ada@example.com")
            == {"email": "ada@example.com", "welcomed": True},
            timeout=30,
            interval=0.1,
        )
    finally:
        for proc in (web, worker):
            proc.send_signal(signal.SIGTERM)
        web.communicate(timeout=30)
        _, worker_err = worker.communicate(timeout=30)
    assert worker.returncode == 0, worker_err


def _up(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
