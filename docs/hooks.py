"""MkDocs hooks: the reference pages that are generated, so they cannot drift.

* ``<!-- cli -->``: the ``--help`` of ``pgpubsub`` and of each command, from the parser.
* ``<!-- errors -->``: the exception tree, from ``pgpubsub.errors``.
* ``<!-- schema -->``: ``sql/schema.sql``, the file ``pgpubsub migrate`` applies.
"""

from __future__ import annotations

import argparse
import inspect
import re
from typing import Any


def _cli() -> str:
    import os

    from pgpubsub.cli import parser

    os.environ["COLUMNS"] = "100"  # the same wrapping on every machine
    parts: list[str] = []

    def render(p: argparse.ArgumentParser, title: str, level: int) -> None:
        parts.extend([f"{'#' * level} {title}", "", "```text", p.format_help().rstrip(), "```", ""])
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    render(sub, f"{title} {name}", min(level + 1, 3))

    render(parser(), "pgpubsub", 2)
    return "\n".join(parts)


def _errors() -> str:
    from pgpubsub import errors

    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.PgPubSubError)
    ]
    lines = ["```text"]

    def walk(cls: type, depth: int) -> None:
        lines.append("    " * depth + cls.__name__)
        for sub in sorted((c for c in classes if cls in c.__bases__), key=lambda c: c.__name__):
            walk(sub, depth + 1)

    walk(errors.PgPubSubError, 0)
    lines.append("```")
    table = ["", "| exception | when |", "|---|---|"]
    for cls in [errors.PgPubSubError, *sorted(
        (c for c in classes if c is not errors.PgPubSubError), key=lambda c: c.__name__
    )]:
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        table.append(f"| `{cls.__name__}` | {doc} |")
    return "\n".join(lines + table)


def _schema() -> str:
    from pgpubsub.durable import schema_sql

    return "```sql\n" + schema_sql().strip() + "\n```"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    for marker, make in (("<!-- cli -->", _cli), ("<!-- errors -->", _errors),
                         ("<!-- schema -->", _schema)):
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown


_ROLE = re.compile(r":(?:class|func|mod|meth|data|attr|exc|obj):(?=<code)")


def on_page_content(html: str, **kwargs: Any) -> str:
    """Docstrings are written for Sphinx as well: drop the roles (``:class:``) and the
    leading ``~`` of shortened names, keeping the code."""
    html = _ROLE.sub("", html)
    return re.sub(r"(<code[^>]*>)~", r"\1", html)
