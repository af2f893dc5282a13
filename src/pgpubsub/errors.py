"""The one exception hierarchy of pgpubsub.

Every error raised by the library derives from :class:`PgPubSubError`. When a
driver error caused it, that error is the ``__cause__``. All classes are
picklable (they keep their message in ``args``), so they cross process
boundaries in the multi-process worker unchanged::

    PgPubSubError
    ├── InvalidChannelName      (also ValueError)   bad channel name, raised before any SQL
    ├── PayloadError            (also ValueError)   payload cannot be sent or decoded
    │   ├── PayloadTooLarge                          over PostgreSQL's 7999-byte NOTIFY limit
    │   └── SchemaMismatch                           payload does not match the channel's fields
    ├── ChannelNotFound         (also LookupError)  dotted path names no channel
    ├── DatabaseConnectionError                      no usable connection to the server
    │   ├── ConnectionFailed                         a connection could not be opened
    │   └── ConnectionLost                           an open connection dropped
    ├── DatabaseError                                the server refused a statement
    │   ├── SchemaMissing                            pgpubsub's schema is not installed
    │   └── PermissionDenied                         the role lacks a privilege
    ├── ListenerStateError                          call not valid in the current state
    ├── AttemptStopped                              a durable listener was asked to stop
    │   ├── AttemptTimeout      (also TimeoutError) it ran longer than its channel's timeout
    │   └── MessageCancelled                         its message was cancelled while it ran
    │                                                (or, from handle.result(), at all)
    ├── MessageFailed                                an awaited message is dead: its error
    ├── ResultTimeout           (also TimeoutError) handle.result() waited its timeout out
    └── ConfigurationError                          bad settings or arguments
        └── NoListener                               a channel has no listener in this process
"""

from __future__ import annotations

__all__ = [
    "AttemptStopped",
    "AttemptTimeout",
    "ChannelNotFound",
    "ConfigurationError",
    "ConnectionFailed",
    "ConnectionLost",
    "DatabaseConnectionError",
    "DatabaseError",
    "InvalidChannelName",
    "ListenerStartError",
    "ListenerStateError",
    "MessageCancelled",
    "MessageFailed",
    "NoListener",
    "PayloadError",
    "PayloadTooLarge",
    "PermissionDenied",
    "PgPubSubError",
    "ResultTimeout",
    "SchemaMismatch",
    "SchemaMissing",
]


class PgPubSubError(Exception):
    """Root of every error raised by pgpubsub."""


class InvalidChannelName(PgPubSubError, ValueError):
    """A channel name is empty, too long, not a string, or contains NUL."""


class PayloadError(PgPubSubError, ValueError):
    """A payload cannot be sent or cannot be decoded."""


class PayloadTooLarge(PayloadError):
    """A plain-channel payload is over PostgreSQL's NOTIFY limit (in UTF-8 bytes)."""


class SchemaMismatch(PayloadError):
    """A payload does not match the fields declared by its channel."""


class ChannelNotFound(PgPubSubError, LookupError):
    """A dotted path or wire name names no known channel."""


class DatabaseConnectionError(PgPubSubError):
    """No usable connection to the server; the driver error is ``__cause__``."""


class ConnectionFailed(DatabaseConnectionError):
    """A connection could not be opened (server down, wrong address or credentials)."""


class ConnectionLost(DatabaseConnectionError):
    """An open connection to the server was lost; the driver error is ``__cause__``."""


class DatabaseError(PgPubSubError):
    """The server refused a statement; the driver error is ``__cause__``."""


class SchemaMissing(DatabaseError):
    """pgpubsub's schema is not installed in this database: run ``pgpubsub migrate``."""


class PermissionDenied(DatabaseError):
    """The role lacks a privilege that the call needs (named in the message)."""


class ListenerStateError(PgPubSubError):
    """A call that the listener's current state does not allow (e.g. not started)."""


#: Name used by the psqlpy ``Listener`` documents for "not started yet".
ListenerStartError = ListenerStateError


class AttemptStopped(PgPubSubError):
    """A durable listener was asked to stop (see :func:`pgpubsub.durable.cancellation`)."""


class AttemptTimeout(AttemptStopped, TimeoutError):
    """A durable listener ran longer than its channel's ``timeout``: the attempt failed."""


class MessageCancelled(AttemptStopped):
    """A durable message was cancelled while its listener ran: it ends cancelled."""


class MessageFailed(PgPubSubError):
    """An awaited durable message is dead: ``message_id`` and its final ``error`` (text).

    Raised by ``handle.result()`` (:mod:`pgpubsub._results`); the error is the
    traceback text its last attempt stored (the exception itself stayed in the
    worker's process).
    """

    def __init__(self, message_id: int, error: str) -> None:
        super().__init__(message_id, error)

    @property
    def message_id(self) -> int:
        return int(self.args[0])

    @property
    def error(self) -> str:
        return str(self.args[1])

    def __str__(self) -> str:
        last = self.error.strip().splitlines()[-1:] or ["(no error text)"]
        return f"message {self.message_id} failed for good: {last[0]}"


class ResultTimeout(PgPubSubError, TimeoutError):
    """``handle.result(timeout=...)`` found no outcome in time; the message is left alone."""


class ConfigurationError(PgPubSubError):
    """Settings or arguments that cannot work."""


class NoListener(ConfigurationError):
    """A durable channel's messages were to be processed with no listener to run them."""
