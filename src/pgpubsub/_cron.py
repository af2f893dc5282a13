"""Cron expressions and time zones of scheduled channels (croniter, ``pgpubsub[schedule]``)."""

from __future__ import annotations

import datetime
from typing import Any

from .errors import ConfigurationError

__all__ = ["check", "croniter", "zone"]


def croniter() -> Any:
    try:
        from croniter import croniter as cls
    except ImportError:
        raise ConfigurationError(
            "scheduled channels need croniter: pip install 'pgpubsub[schedule]'"
        ) from None
    return cls


def zone(name: str, path: str) -> datetime.tzinfo:
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"{path}: unknown timezone {name!r}") from exc


def check(expression: Any, timezone: Any, path: str) -> None:
    """A ConfigurationError naming the channel when its schedule cannot work."""
    cls = croniter()
    if not isinstance(expression, str) or not cls.is_valid(expression):
        raise ConfigurationError(f"{path}: schedule {expression!r} is not a cron expression")
    zone(timezone, path)
