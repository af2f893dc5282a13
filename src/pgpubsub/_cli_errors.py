"""Failures of the ``pgpubsub`` command that are not library errors, with their exit codes."""

from __future__ import annotations

from .errors import PgPubSubError

__all__ = ["CheckFailed", "NotFound", "UsageError"]


class UsageError(PgPubSubError):
    """The command line is wrong, or a destructive action lacks ``--yes`` (exit 2)."""


class NotFound(PgPubSubError):
    """A message id names no stored message (exit 1)."""


class CheckFailed(PgPubSubError):
    """The database and schema are fine, but work waits too long (exit 1)."""
