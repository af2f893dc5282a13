"""Channels used by the tests; this module uses postponed annotations on purpose."""

from __future__ import annotations

import datetime
import enum
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

from pgpubsub.channel import Channel, TriggerChannel


# django-pgpubsub's example channels, as its example app writes them (a None
# default without Optional; a subclass giving a field a default).
@dataclass
class Reads(Channel):
    model_id: int
    model_type: str
    date: datetime.date = None  # type: ignore[assignment]


@dataclass
class PostReads(Reads):
    model_type: str = "Post"


@dataclass
class LockedPostReads(PostReads):
    lock_notifications = True


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Point:
    x: float
    y: float


@dataclass
class Everything(Channel, name="Everything Typed"):
    i: int
    s: str
    f: float
    b: bool
    maybe: int | None
    day: datetime.date
    naive: datetime.datetime
    aware: datetime.datetime
    uid: uuid.UUID
    money: Decimal
    colour: Colour
    raw: bytes
    ints: list[int]
    tags: set[str]
    pair: tuple[int, str]
    mapping: dict[str, float]
    point: Point
    points: list[Point]
    no_day: datetime.date | None = None
    default_list: list[str] = field(default_factory=list)


@dataclass
class Optionals(Channel):
    required: int
    extra: str | None = None
    flag: bool = False


@dataclass
class Event(Channel):
    """A parent channel: ``--channels app.channels.Event`` selects its subclasses."""

    n: int


@dataclass
class Created(Event):
    pass


@dataclass
class Deleted(Event):
    pass


@dataclass
class Jobs(Channel, lock_notifications=True, max_attempts=3, retry_delay=0.05):
    """A durable channel: each message's effect exactly once."""

    n: int
    blob: str = ""


@dataclass
class SeedStyleDurable(Channel):
    n: int
    lock_notifications = True


@dataclass
class OrderEvents(TriggerChannel, table=('we"ird', "Order")):
    """A plain trigger channel on a table whose names need quoting."""


@dataclass
class OrderJobs(TriggerChannel, table=('we"ird', "Order"), lock_notifications=True):
    """The same table, durable: each row event processed exactly once."""

    retry_delay = 0.05
