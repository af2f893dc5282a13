"""The migration guides' peer versions of the welcome-email app run (docs/migrating/peers/).

procrastinate and pgqueuer are in the ``peers`` extra (and the test extra);
each test is skipped when its library is missing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

PEERS = Path(__file__).parent.parent / "docs" / "migrating" / "peers"


def load(name: str) -> object:
    spec = importlib.util.spec_from_file_location(f"peer_{name}", PEERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("library", ["procrastinate", "pgqueuer"])
def test_the_peer_version_of_the_guide_app_runs(dsn: str, library: str) -> None:
    pytest.importorskip(library)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE sent (user_id int)")
    app = load(f"{library}_app")
    p = conninfo_to_dict(dsn)
    url = f"postgresql://{p['user']}@{p['host']}:{p['port']}/{p['dbname']}"
    assert app.run(url) == [1, 2]  # type: ignore[attr-defined]
