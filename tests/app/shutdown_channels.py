"""The durable channel of the shutdown tests (its listener: app.shutdown_listeners)."""

from __future__ import annotations

from dataclasses import dataclass

from pgpubsub import Channel


@dataclass
class Hangs(Channel, lock_notifications=True, max_attempts=3, retry_delay=0.1):
    n: int
