"""pgpubsub: PostgreSQL LISTEN/NOTIFY pub/sub and durable message processing.

Levels, from the wire up:

* :mod:`pgpubsub.pubsub` - one connection: ``connect()``, ``notify``, ``listen``, ``events``.
* :mod:`pgpubsub.engine` - the supervised listening engine every level below builds on.
* :mod:`pgpubsub.asynclistener` - ``Listener`` / ``ConnectionPool`` (asyncio, callbacks).
* :mod:`pgpubsub.notifier` - ``Notifier`` (threads, subscribers, muting).
"""

from .asynclistener import Connection, ConnectionPool, Listener, ListenerNotificationMsg
from .backoff import Backoff
from .engine import Engine, Gap, Status
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
from .notifier import Notifier
from .pubsub import AsyncPubSub, Notify, PubSub, connect, connect_async

__all__ = [
    "AsyncPubSub",
    "Backoff",
    "Connection",
    "ConnectionPool",
    "Engine",
    "Gap",
    "Listener",
    "ListenerNotificationMsg",
    "Notifier",
    "Status",
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
