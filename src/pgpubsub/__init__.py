"""pgpubsub: PostgreSQL LISTEN/NOTIFY pub/sub and durable message processing.

Levels, from the wire up:

* :mod:`pgpubsub.pubsub` - one connection: ``connect()``, ``notify``, ``listen``, ``events``.
* :mod:`pgpubsub.engine` - the supervised listening engine every level below builds on.
* :mod:`pgpubsub.asynclistener` - ``Listener`` / ``ConnectionPool`` (asyncio, callbacks).
* :mod:`pgpubsub.notifier` - ``Notifier`` (threads, subscribers, muting).
* :mod:`pgpubsub.channel`, :mod:`pgpubsub.listen`, :mod:`pgpubsub.notify`,
  :mod:`pgpubsub.worker` - typed channels, ``@listener``, ``notify()``, the worker.
* :mod:`pgpubsub.durable` - ``lock_notifications``: stored, exactly-once, retried messages;
  :mod:`pgpubsub.messages` - list, replay and purge them.
* ``pgpubsub.batch`` / ``abatch`` / ``handle`` - results of durable messages, awaiting
  them, and batches (fan-in): see :mod:`pgpubsub._results`.
* :mod:`pgpubsub.triggers` - ``TriggerChannel`` listeners: row events of a table.
* :mod:`pgpubsub.health` - ``status()``: database, schema, queues and live workers.
* Django: add ``pgpubsub`` (and ``pgtrigger``) to ``INSTALLED_APPS``; see :mod:`pgpubsub.apps`.
"""

from . import _startup  # noqa: F401  (first: `pgpubsub listen` notes a SIGTERM while it starts)

# isort: split
from . import _clash  # noqa: F401  (next: raises PackageClash beside django-pgpubsub)
from ._results import Batch, BatchOutcome, Handle, abatch, batch, handle
from .asynclistener import Connection, ConnectionPool, Listener, ListenerNotificationMsg
from .backoff import Backoff
from .channel import Channel, TriggerChannel
from .durable import process_stored_notifications
from .engine import Engine, Gap, Status
from .errors import (
    ChannelNotFound,
    ConfigurationError,
    ConnectionFailed,
    ConnectionLost,
    DatabaseConnectionError,
    DatabaseError,
    InvalidChannelName,
    ListenerStartError,
    ListenerStateError,
    MessageCancelled,
    MessageFailed,
    NoListener,
    PayloadError,
    PayloadTooLarge,
    PermissionDenied,
    PgPubSubError,
    ResultTimeout,
    SchemaMismatch,
    SchemaMissing,
)
from .health import Health, status
from .listen import listener, registry
from .notifier import Notifier
from .notify import anotify, notify, notify_many
from .pubsub import AsyncPubSub, Notify, PubSub, connect, connect_async
from .triggers import (
    install_triggers,
    post_delete_listener,
    post_insert_listener,
    post_save_listener,
    post_update_listener,
    pre_delete_listener,
    pre_insert_listener,
    pre_save_listener,
    pre_update_listener,
    remove_triggers,
    set_notification_context,
    trigger_listener,
)

# The name `pgpubsub.notify` is the function; the django-pgpubsub documents
# also spell it by its module path, `pgpubsub.notify.notify`.
setattr(notify, "notify", notify)  # noqa: B010

__all__ = [
    "AsyncPubSub",
    "Backoff",
    "Batch",
    "BatchOutcome",
    "Handle",
    "MessageCancelled",
    "MessageFailed",
    "ResultTimeout",
    "abatch",
    "batch",
    "handle",
    "Channel",
    "Connection",
    "ConnectionPool",
    "Engine",
    "Gap",
    "Health",
    "Listener",
    "ListenerNotificationMsg",
    "Notifier",
    "Status",
    "ChannelNotFound",
    "ConfigurationError",
    "ConnectionFailed",
    "ConnectionLost",
    "DatabaseConnectionError",
    "DatabaseError",
    "InvalidChannelName",
    "ListenerStartError",
    "ListenerStateError",
    "NoListener",
    "Notify",
    "PayloadError",
    "PayloadTooLarge",
    "PermissionDenied",
    "PgPubSubError",
    "PubSub",
    "SchemaMismatch",
    "SchemaMissing",
    "TriggerChannel",
    "anotify",
    "connect",
    "connect_async",
    "listener",
    "notify",
    "notify_many",
    "process_stored_notifications",
    "registry",
    "status",
    "install_triggers",
    "post_delete_listener",
    "post_insert_listener",
    "post_save_listener",
    "post_update_listener",
    "pre_delete_listener",
    "pre_insert_listener",
    "pre_save_listener",
    "pre_update_listener",
    "remove_triggers",
    "set_notification_context",
    "trigger_listener",
]
