"""The fixtures of the ``pgpubsub.testing`` pytest plugin."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from ..durable import migrate
from ._capture import APPLICATION, CAPTURE_SQL, Capture

__all__ = ["copy_of_template", "pgpubsub_dsn", "pgpubsub_server"]

TEMPLATE = "pgpubsub_testing_template"
_names = itertools.count()


def _admin(conninfo: str, query: str, *names: str) -> None:
    statement = sql.SQL(query).format(*(sql.Identifier(n) for n in names))
    with psycopg.connect(conninfo, autocommit=True, application_name=APPLICATION) as conn:
        conn.execute(statement)


def _drop(conninfo: str, name: str) -> None:
    _admin(conninfo, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


@pytest.fixture(scope="session")
def pgpubsub_server() -> Iterator[str]:
    """The conninfo of a template database with the pgpubsub schema, made once a session.

    On the server ``PGPUBSUB_TEST_DSN`` names (a superuser conninfo), else on an
    embedded server started for the session. Each test's database is a copy.
    """
    given = os.environ.get("PGPUBSUB_TEST_DSN")
    server = None
    if not given:
        from ..embedded import EmbeddedServer

        server = EmbeddedServer(prepare=True).start()
    admin = given or server.conninfo  # type: ignore[union-attr]
    template = f"{TEMPLATE}_{os.getpid()}"
    _drop(admin, template)
    _admin(admin, "CREATE DATABASE {}", template)
    try:
        template_dsn = make_conninfo(admin, dbname=template)
        migrate(template_dsn)
        with psycopg.connect(template_dsn, autocommit=True, application_name=APPLICATION) as conn:
            conn.execute(CAPTURE_SQL)
        yield make_conninfo(admin, dbname=template)
    finally:
        _drop(admin, template)
        if server is not None:
            server.close()


@contextlib.contextmanager
def copy_of_template(template_dsn: str) -> Iterator[str]:
    """The conninfo of a new database copied from the template, dropped at the end."""
    template = str(psycopg.conninfo.conninfo_to_dict(template_dsn)["dbname"])
    name = f"pgpubsub_testing_{os.getpid()}_{next(_names)}"
    _admin(template_dsn, "CREATE DATABASE {} TEMPLATE {}", name, template)
    try:
        yield make_conninfo(template_dsn, dbname=name)
    finally:
        _drop(template_dsn, name)


@pytest.fixture
def pgpubsub_dsn(pgpubsub_server: str) -> Iterator[str]:
    """The conninfo of a new database with the pgpubsub schema, dropped after the test."""
    with copy_of_template(pgpubsub_server) as dsn:
        capture = Capture.open(dsn)
        try:
            yield dsn
        finally:
            capture.close()
