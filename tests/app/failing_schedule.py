"""A scheduled channel whose scheduler fails in the worker: its schedule is changed to an
impossible one after the declaration's check (a stand-in for any bug in a background task)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import pgpubsub
from pgpubsub.channel import Channel, spec_of


@dataclass
class Failing(Channel, name="failing_schedule", lock_notifications=True, schedule="* * * * *"):
    scheduled_at: datetime.datetime | None = None


spec_of(Failing)
Failing.schedule = "0 0 31 2 *"


@pgpubsub.listener(Failing)
def tick(scheduled_at: datetime.datetime) -> None:
    pass
