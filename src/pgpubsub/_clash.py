"""Refuse to run beside another distribution that installs a top-level ``pgpubsub`` package.

pgpubsub 0.0.5 (distribution ``pgpubsub``) and django-pgpubsub both install a
package named ``pgpubsub``: installed next to ``pgpubsub-engine`` they write
into the same folder, so the files on disk are a mix of two libraries and the
failures that follow (a missing name, a wrong signature) say nothing about why.
``import pgpubsub`` checks the installed distributions once and raises
:class:`PackageClash` (an ``ImportError``) whose one line names the other
distribution and the command that fixes it.

Earlier builds of this library were published under the distribution name
``pgpubsub`` with versions 0.1 and later: those are ours, not a clash.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["PackageClash", "check", "clashing"]

# Distributions whose top-level package is also `pgpubsub`, and the predicate
# on their version that tells the other library from an older build of ours.
_OTHERS: dict[str, str] = {
    "pgpubsub": "pgpubsub 0.0.5 (the older library of that name)",
    "django-pgpubsub": "django-pgpubsub",
}


class PackageClash(ImportError):
    """Another distribution installs the same top-level ``pgpubsub`` package as this one."""


def _is_other(name: str, version: str) -> bool:
    if name != "pgpubsub":
        return True
    major_minor = version.split(".")[:2]
    try:
        return tuple(int(part) for part in major_minor) < (0, 1)
    except ValueError:
        return True


def clashing() -> list[str]:
    """``"name version"`` of each installed distribution that clashes with this one."""
    found = []
    for name in _OTHERS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if _is_other(name, version):
            found.append(f"{name} {version}")
    return found


def check() -> None:
    """Raise :class:`PackageClash` when a clashing distribution is installed."""
    found = clashing()
    if found:
        names = " ".join(item.split()[0] for item in found)
        raise PackageClash(
            f"{', '.join(found)} is installed next to pgpubsub-engine and both install the "
            f"`pgpubsub` package: run `pip uninstall {names}` then "
            f"`pip install --force-reinstall pgpubsub-engine`"
        )


check()
