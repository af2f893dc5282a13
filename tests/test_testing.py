"""pgpubsub.testing as users run it: their own projects, their own test commands.

``tests/user_project`` is a pytest project (``pytest_plugins =
["pgpubsub.testing"]``) and ``tests/user_project_django`` a Django project
tested with ``manage.py test`` and ``PubSubTestCase``; each tests a durable
listener that writes a row and one that fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.acceptance

TESTS = Path(__file__).parent


def run(cwd: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PGPUBSUB_")}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**base, "PYTHONPATH": str(cwd), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_pytest_project_on_its_own_embedded_server() -> None:
    out = run(TESTS / "user_project", ["-m", "pytest", "-q"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "9 passed" in out.stdout


def test_the_projects_tests_catch_a_bug_in_its_listener(pg_server: object) -> None:
    admin = pg_server.admin  # type: ignore[attr-defined]
    out = run(TESTS / "user_project", ["-m", "pytest", "-q"], SHOP_BUG="1", PGPUBSUB_TEST_DSN=admin)
    assert out.returncode == 1
    assert "1 failed, 8 passed" in out.stdout
    assert "test_a_paid_order_is_recorded_exactly_once" in out.stdout


def test_a_django_project_with_testcase(dsn: str) -> None:
    out = run(TESTS / "user_project_django", ["manage.py", "test", "--noinput"], SHOP_DSN=dsn)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Ran 7 tests" in out.stderr and "OK" in out.stderr


@pytest.mark.unit
def test_the_helpers_need_no_pytest() -> None:
    """A Django project tested with manage.py may have no pytest installed."""
    code = (
        "import sys, pgpubsub.testing, pgpubsub.testing.django; "
        "assert 'pytest' not in sys.modules"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "DJANGO_SETTINGS_MODULE": ""},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
