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
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
