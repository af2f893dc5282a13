"""pgpubsub: PostgreSQL LISTEN/NOTIFY pub/sub and durable message processing.

Levels, from the wire up:

* :mod:`pgpubsub.pubsub` - one connection: ``connect()``, ``notify``, ``listen``, ``events``.
"""

from .errors import (
    ChannelNotFound,
    ConfigurationError,
    ConnectionLost,
    InvalidChannelName,
    ListenerStartError,
    ListenerStateError,
    PayloadError,
    PayloadTooLarge,
    PgPubSubError,
    SchemaMismatch,
)
from .pubsub import AsyncPubSub, Notify, PubSub, connect, connect_async

__all__ = [
    "AsyncPubSub",
    "ChannelNotFound",
    "ConfigurationError",
    "ConnectionLost",
    "InvalidChannelName",
    "ListenerStartError",
    "ListenerStateError",
    "Notify",
    "PayloadError",
    "PayloadTooLarge",
    "PgPubSubError",
    "PubSub",
    "SchemaMismatch",
    "connect",
    "connect_async",
]
