import datetime
from dataclasses import dataclass

from pgpubsub.channel import Channel, TriggerChannel
from pgpubsub.tests.models import Author, Book, Post


@dataclass
class Reads(Channel):
    model_id: int
    model_type: str
    date: datetime.date = None


@dataclass
class PostReads(Reads):
    model_type: str = "Post"


@dataclass
class AuthorTriggerChannel(TriggerChannel):
    model = Author
    lock_notifications = True


@dataclass
class PostTriggerChannel(TriggerChannel):
    model = Post


@dataclass
class BookTriggerChannel(TriggerChannel):
    model = Book


@dataclass
class Greetings(Channel):
    """Several listeners, each taking some of the optional fields."""

    name: str
    greeting: str | None = None
    times: int = 1


@dataclass
class AuthorRenamedChannel(TriggerChannel):
    """Renamed authors: its listener brings its own Notify trigger, with a condition."""

    model = Author
