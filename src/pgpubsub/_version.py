"""The installed pgpubsub version (``pgpubsub --version``, the worker registry)."""

from __future__ import annotations

from importlib import metadata

__all__ = ["version"]


def version() -> str:
    try:
        return metadata.version("pgpubsub")
    except metadata.PackageNotFoundError:
        return "unknown"
