"""The public surface is what the API reference documents.

Every module of the package whose dotted name has no part with a leading
underscore is public: it must be documented in ``docs/reference/`` (a
``::: pgpubsub.x`` block), or be one of the paths that Django or the seed
designs fix (``admin``, ``apps``, ``models``, ``migrations``, ``management``,
the example app ``pgpubsub.tests``, the ``pgpubsub`` command's ``cli``).
A new module is internal (``_name.py``) unless the reference documents it.
"""

from __future__ import annotations

import pkgutil
import re
from pathlib import Path

import pytest

import pgpubsub

pytestmark = pytest.mark.unit

REFERENCE = Path(__file__).parent.parent / "docs" / "reference"
# Paths that Django and the seed designs (django-pgpubsub's example app) fix.
FIXED = ("pgpubsub.admin", "pgpubsub.apps", "pgpubsub.models", "pgpubsub.migrations",
         "pgpubsub.management", "pgpubsub.tests", "pgpubsub.cli")  # fmt: skip


def public_modules() -> set[str]:
    names = {m.name for m in pkgutil.walk_packages(pgpubsub.__path__, "pgpubsub.")}
    return {n for n in names if not any(part.startswith("_") for part in n.split(".")[1:])}


def documented() -> set[str]:
    found = set()
    for page in REFERENCE.glob("*.md"):
        for target in re.findall(r"^::: (pgpubsub[\w.]*)", page.read_text(), re.MULTILINE):
            parts = target.split(".")
            # ``::: pgpubsub.notify.notify`` documents a name of the module pgpubsub.notify
            for end in range(len(parts), 0, -1):
                if ".".join(parts[:end]) in public_modules() | {"pgpubsub"}:
                    found.add(".".join(parts[:end]))
                    break
    return found


def test_every_public_module_is_documented_or_fixed() -> None:
    undocumented = {
        name
        for name in public_modules() - documented()
        if not any(name == f or name.startswith(f + ".") for f in FIXED)
    }
    assert not undocumented, (
        f"public modules the API reference does not document: {sorted(undocumented)}; "
        "document them in docs/reference/ or name them with a leading underscore"
    )


def test_the_reference_documents_only_modules_that_exist() -> None:
    assert documented() <= public_modules() | {"pgpubsub"}


def test_results_and_batches_are_exported() -> None:
    for name in ("batch", "abatch", "handle", "Handle", "Batch", "BatchOutcome", "MessageFailed",
                 "MessageCancelled", "ResultTimeout"):  # fmt: skip
        assert name in pgpubsub.__all__ and hasattr(pgpubsub, name), name
