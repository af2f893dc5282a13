"""The installed pgpubsub version (``pgpubsub --version``, the worker registry).

The distribution on the package index is ``pgpubsub-engine``: the name
``pgpubsub`` belongs to pgpubsub 0.0.5, the seed library this one replaces.
The import package stays ``pgpubsub``.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["DISTRIBUTION", "version"]

DISTRIBUTION = "pgpubsub-engine"


def version() -> str:
    for name in (DISTRIBUTION, "pgpubsub"):  # then a build of ours from before the rename
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if name == DISTRIBUTION or not found.startswith("0.0."):
            return found
    return "unknown"
