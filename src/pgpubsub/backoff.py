"""Capped exponential backoff with full jitter: reconnects and message retries."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


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
