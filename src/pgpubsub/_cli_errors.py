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


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (0: any free one)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is not from 0 to 65535")
    return value


def seconds(text: str) -> float:
    """An argparse type: a finite, non-negative number of seconds."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of seconds >= 0")
    return value
