"""Capped exponential backoff with full jitter: reconnects and message retries."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff", "worth_logging"]


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt ``n`` (0-based): uniform in ``[base, min(cap, base * factor**n)]``.

    Full jitter spreads reconnecting clients apart so that a restarted server
    is not hit by all of them at once; the floor ``base`` keeps a failing
    server from being retried in a tight loop.
    """

    base: float = 0.1
    factor: float = 2.0
    cap: float = 10.0

    def ceiling(self, attempt: int) -> float:
        return float(min(self.cap, self.base * self.factor ** min(attempt, 64)))

    def delay(self, attempt: int) -> float:
        return random.uniform(self.base, max(self.base, self.ceiling(attempt)))  # noqa: S311


def worth_logging(failures: int) -> bool:
    """Whether the ``failures``-th failure in a row gets a warning: the 1st, 2nd, 4th, 8th ...
    then every 64th, so an outage of hours is a few lines, not one a second."""
    return failures & (failures - 1) == 0 or failures % 64 == 0
