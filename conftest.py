"""The Python examples of the README and of the documentation are tests (Sybil).

Each Markdown file is run top to bottom, its examples sharing one namespace
with ``dsn``: a fresh database with the pgpubsub schema (the
``pgpubsub.testing`` plugin's ``pgpubsub_server``), one per page. The
listeners registered by one page are gone before the next. A block that
includes a file (``--8<-- "path"``) shows code the test suite runs elsewhere:
the file must exist and compile.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sybil import Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, SkipParser

pytest_plugins = ["pgpubsub.testing"]

ROOT = Path(__file__).parent


# Pages that promise their examples run as written from a fresh database: they
# get one without the pgpubsub schema, so they must install it themselves.
FRESH = {"README.md", "docs/getting-started.md"}


@pytest.fixture(scope="module")
def doc_dsn(pgpubsub_server: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """One database per page: its examples build on each other."""
    import psycopg

    from pgpubsub.testing.fixtures import copy_of_template

    with copy_of_template(pgpubsub_server) as dsn:
        if Path(request.path).relative_to(ROOT).as_posix() in FRESH:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("DROP SCHEMA pgpubsub CASCADE")
        yield dsn


class IncludedCode(CodeBlockParser):
    """``--8<-- "file"`` blocks (pymdownx.snippets): the file exists and compiles."""

    language = "python"

    def __call__(self, document: Any) -> Any:
        for region in super().__call__(document):
            if str(region.parsed).strip().startswith("--8<--"):
                yield region

    def evaluate(self, example: Any) -> None:
        path = ROOT / str(example.parsed).strip().split('"')[1]
        compile(path.read_text(), str(path), "exec")


class Examples(CodeBlockParser):
    """Python blocks, except the includes, run with ``dsn`` in their namespace."""

    def __init__(self) -> None:
        super().__init__(language="python")
        self.python = PythonEvaluator()

    def __call__(self, document: Any) -> Any:
        for region in super().__call__(document):
            if not str(region.parsed).strip().startswith("--8<--"):
                yield region

    def evaluate(self, example: Any) -> Any:
        example.namespace.setdefault("dsn", example.namespace["doc_dsn"])
        return self.python(example)


def _setup(namespace: dict[str, Any]) -> None:
    from pgpubsub.listen import registry

    namespace["_saved_listeners"] = dict(registry._listeners)
    registry._listeners.clear()


def _teardown(namespace: dict[str, Any]) -> None:
    from pgpubsub.listen import registry

    registry._listeners.clear()
    registry._listeners.update(namespace["_saved_listeners"])


# Tests that run the library's processes (the CLI, workers killed and restarted,
# the browser): timing and signals, so they share one test process, one after
# the other, while the in-process tests run beside them (pyproject's addopts:
# two processes, ``--dist loadgroup``; ``-n 0`` runs everything in one).
PROCESSES = ("chaos", "acceptance", "browser")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup``: the process tests in one group.

    Any other test is grouped by its file (xdist's default for tests without a
    group): a file's tests stay together and in order (a page's examples build
    on the ones before, and a module's fixtures are set up once).
    """

    if not config.getoption("loadgroup", False):
        return
    for item in items:
        if any(item.get_closest_marker(name) for name in PROCESSES):
            item.add_marker(pytest.mark.xdist_group("processes"))
        else:
            item.add_marker(pytest.mark.xdist_group(item.path.relative_to(ROOT).as_posix()))


pytest_collect_file = Sybil(
    parsers=[Examples(), IncludedCode(), SkipParser()],
    patterns=["*.md"],
    path=str(ROOT),
    fixtures=["doc_dsn"],
    setup=_setup,
    teardown=_teardown,
).pytest()



