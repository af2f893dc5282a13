"""Job-queue channels and listeners for the durable-options tests (real worker processes)."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import psycopg

import pgpubsub
from pgpubsub.channel import Channel
from pgpubsub.durable import connection


@dataclass
class Ordered(Channel, name="ordered", lock_notifications=True, concurrency=2):
    key: str
    seq: int


@pgpubsub.listener(Ordered)
def record_ordered(key: str, seq: int) -> None:
    # nextval in the handler: the order in which messages were handled.
    connection().execute(
        "INSERT INTO handled (key, seq, pid, at) VALUES (%s, %s, %s, nextval('handled_order'))",
        (key, seq, os.getpid()),
    )
    if seq % 50 == 0:
        time.sleep(0.002)  # let the other workers overtake, if they could


@dataclass
class Limited(Channel, name="limited", lock_notifications=True, concurrency=3, max_in_flight=3):
    n: int


@pgpubsub.listener(Limited)
def limited(n: int) -> None:
    with psycopg.connect(os.environ["PGPUBSUB_DSN"], autocommit=True) as conn:
        conn.execute("INSERT INTO in_flight (n, pid, delta) VALUES (%s, %s, 1)", (n, os.getpid()))
        time.sleep(0.02)
        conn.execute("INSERT INTO in_flight (n, pid, delta) VALUES (%s, %s, -1)", (n, os.getpid()))


@dataclass
class EverySecond(Channel, name="every_second", lock_notifications=True, schedule="* * * * * *"):
    scheduled_at: datetime.datetime | None = None


@pgpubsub.listener(EverySecond)
def tick(scheduled_at: datetime.datetime) -> None:
    connection().execute(
        "INSERT INTO ticks (scheduled_at, pid) VALUES (%s, %s)", (scheduled_at, os.getpid())
    )
