"""The Django guide, step by step, as a new user follows it (docs/guides/django.md).

An empty project from ``django-admin startproject``, an app from ``startapp``,
the guide's files copied in (``tests/django_tutorial/``, which the guide
includes), ``makemigrations`` and ``migrate``, then the worker, an order saved
through the ORM, its receipt written by the listener, and ``manage.py pgpubsub``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import admin_query, wait_until
from psycopg.conninfo import conninfo_to_dict

pytestmark = pytest.mark.acceptance

TUTORIAL = Path(__file__).parent / "django_tutorial"


def test_the_django_guide_from_startproject_to_a_receipt(dsn: str, tmp_path: Path) -> None:
    params = conninfo_to_dict(dsn)
    dropped = ("PGPUBSUB_DSN", "PYTHONPATH", "DJANGO_SETTINGS_MODULE")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(
        PGHOST=str(params["host"]),
        PGPORT=str(params["port"]),
        PGUSER=str(params["user"]),
        PGDATABASE=str(params["dbname"]),
        PYTHONUNBUFFERED="1",
    )

    def run(*argv: str) -> str:
        out = subprocess.run(
            [sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=120,
        )
        assert out.returncode == 0, (argv, out.stdout, out.stderr)
        return out.stdout

    run("-m", "django", "startproject", "mysite", ".")
    run("manage.py", "startapp", "shop")
    for name in ("models.py", "channels.py", "listeners.py", "apps.py"):
        shutil.copy(TUTORIAL / "shop" / name, tmp_path / "shop" / name)
    settings = tmp_path / "mysite" / "settings.py"
    settings.write_text(settings.read_text() + "\n" + (TUTORIAL / "settings_tail.py").read_text())
    made = run("manage.py", "makemigrations", "shop")
    assert "Create model Order" in made and "Create model Receipt" in made
    migration = (tmp_path / "shop" / "migrations" / "0001_initial.py").read_text()
    assert "pgtrigger" in migration  # the trigger of OrderChanged, in the app's migration
    run("manage.py", "migrate")
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "listen"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        run(
            "manage.py", "shell", "-c",
            "from shop.models import Order; Order.objects.create(customer='Ada', total='9.50')",
        )
        wait_until(
            lambda: admin_query(dsn, "SELECT text FROM shop_receipt") == [("Ada paid 9.50",)],
            timeout=30,
        )
        said = run("manage.py", "pgpubsub", "publish", "greetings", '{"name": "Ada"}')
        assert said.startswith("sent on channel 'greetings'")  # the project's channel, by name
        status = run("manage.py", "pgpubsub", "status")
        assert status.startswith("database  ok") and "workers   1 live" in status, status
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, out
    assert "hello, Ada" in out, out
