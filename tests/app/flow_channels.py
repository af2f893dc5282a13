"""The durable channels of the flow-control tests (tests/test_flow_control.py); their
listeners: app.flow_listeners."""

from __future__ import annotations

from dataclasses import dataclass

from pgpubsub import Channel


@dataclass
class Pausable(Channel, name="flow.pausable", lock_notifications=True, retry_delay=1):
    n: int


@dataclass
class Paced(Channel, name="flow.paced", lock_notifications=True, rate_limit="50/s", retry_delay=1):
    n: int


@dataclass
class Slow(Channel, name="flow.slow", lock_notifications=True, rate_limit="5/m", retry_delay=1):
    n: int


@dataclass
class PerKey(
    Channel, name="flow.per_key", lock_notifications=True, key_rate_limit="5/s", retry_delay=1
):
    n: int


@dataclass
class Crowded(
    Channel,
    name="flow.crowded",
    lock_notifications=True,
    key_concurrency=2,
    concurrency=4,
    retry_delay=5,
):
    n: int
    sleep: float = 0.15
