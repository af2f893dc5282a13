"""The chaos tier's channels (no listeners here: importing this registers nothing)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from pgpubsub.channel import Channel

RETRY = dict(max_attempts=3, retry_delay=0.2, retry_max_delay=1.0)


@dataclass
class Work(Channel, name="chaos_work", lock_notifications=True, results=True, **RETRY):  # type: ignore[call-arg]
    """Keeps results: each done message's is checked against its committed effect."""

    n: int
    behaviour: str = "ok"
    until: int = 0
    sleep: float = 0.0


@dataclass
class Crew(Channel, name="chaos_crew", lock_notifications=True, concurrency=4, **RETRY):  # type: ignore[call-arg]
    """Four processors a worker process: a claim's rows without a key are handed out to
    the idle ones, each share in a transaction of its own (its listeners take 10 ms at
    least: long enough to be worth a share)."""

    n: int
    behaviour: str = "ok"
    until: int = 0
    sleep: float = 0.0


@dataclass
class Limited(
    Channel,
    name="chaos_limited",
    lock_notifications=True,
    concurrency=3,
    max_in_flight=2,
    key_concurrency=1,  # per limit_key (chaos_ops: L0 and L1)
    key_rate_limit="4/s",  # a bucket of 1 per limit_key
    rate_limit="20/s",  # a bucket of 2
    timeout=2.0,  # chaos_ops.TIMEOUT: its slowest listeners are stopped
    **RETRY,  # type: ignore[call-arg]
):
    n: int
    behaviour: str = "ok"
    until: int = 0
    sleep: float = 0.0


@dataclass
class Tick(Channel, name="chaos_tick", lock_notifications=True, schedule="* * * * * *"):
    scheduled_at: datetime.datetime | None = None


@dataclass
class BatchDone(Channel, name="chaos_batch_done", lock_notifications=True):
    """The callback of the run's batches (no listener: the checker reads the stored ones)."""

    label: str = ""


# The tables the listeners write (chaos_listeners) and the checker reads (chaos_check).
SCHEMA = """
CREATE TABLE chaos_history (
    id bigserial PRIMARY KEY, kind text NOT NULL, channel text NOT NULL, n int, pid int NOT NULL,
    at timestamptz NOT NULL, attempt int, detail text);
CREATE TABLE chaos_effect (channel text NOT NULL, n int, pid int NOT NULL, at timestamptz NOT NULL,
    tick timestamptz);
CREATE TABLE chaos_ref (id int PRIMARY KEY);
CREATE TABLE chaos_deferred (ref int REFERENCES chaos_ref DEFERRABLE INITIALLY DEFERRED);
"""
