"""Channel names and payload limits: the checks every level makes before SQL.

PostgreSQL channel names are identifiers. pgpubsub always quotes them (LISTEN
goes through :class:`psycopg.sql.Identifier`, NOTIFY through
``pg_catalog.pg_notify`` with a bound parameter), so a name is taken exactly as
written: ``Foo`` and ``foo`` are two channels, ``x; DROP TABLE users`` is just
an odd but harmless name. What PostgreSQL cannot represent is rejected here,
before any SQL runs.
"""

from __future__ import annotations

from psycopg import sql

from .errors import InvalidChannelName, PayloadError, PayloadTooLarge

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_PAYLOAD_BYTES",
    "NOTIFY_SQL",
    "check_payload",
    "listen_sql",
    "unlisten_sql",
    "validate_channel",
]

#: NAMEDATALEN - 1: longer identifiers would be silently truncated by the server.
MAX_NAME_BYTES = 63
#: The server rejects payloads of 8000 bytes or more.
MAX_PAYLOAD_BYTES = 7999
#: NOTIFY with the channel and payload as bound parameters (case-exact, never SQL text).
NOTIFY_SQL = "SELECT pg_catalog.pg_notify(%s, %s)"


def validate_channel(name: object) -> str:
    """Return ``name`` if it is a usable channel name, else raise InvalidChannelName.

    A usable name is a non-empty ``str`` of at most 63 UTF-8 bytes with no NUL.
    """
    if not isinstance(name, str):
        raise InvalidChannelName(f"channel name must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidChannelName("channel name must not be empty")
    if "\x00" in name:
        raise InvalidChannelName(f"channel name {name!r} contains a NUL character")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise InvalidChannelName(
            f"channel name {name!r} is {size} bytes in UTF-8; the limit is {MAX_NAME_BYTES}"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidChannelName(f"channel name {name!r} is not valid Unicode") from exc
    return name


def check_payload(payload: object, channel: str = "") -> str:
    """Return ``payload`` if a plain NOTIFY can carry it, else raise a PayloadError.

    The limit is counted in UTF-8 bytes, as the server counts it: 7999 ASCII
    characters pass, 8000 do not, and neither do 4000 two-byte characters.
    """
    where = f" on channel {channel!r}" if channel else ""
    if not isinstance(payload, str):
        raise PayloadError(f"payload{where} must be a str, not {type(payload).__name__}")
    if "\x00" in payload:
        raise PayloadError(f"payload{where} contains a NUL character")
    if len(payload) * 4 <= MAX_PAYLOAD_BYTES and payload.isascii():  # fits: skip encoding
        return payload
    try:
        size = len(payload.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise PayloadError(
            f"payload{where} is not valid Unicode: {exc.reason} at position {exc.start}"
        ) from exc
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"payload{where} is {size} bytes in UTF-8; NOTIFY carries at most "
            f"{MAX_PAYLOAD_BYTES} (use a durable channel for larger messages)"
        )
    return payload


def listen_sql(channels: list[str]) -> sql.Composed:
    """One statement that LISTENs to every channel, each quoted as an identifier."""
    return sql.SQL("").join(
        sql.SQL("LISTEN {};").format(sql.Identifier(validate_channel(c))) for c in channels
    )


def unlisten_sql(channels: list[str]) -> sql.Composed:
    """One statement that UNLISTENs every channel, each quoted as an identifier."""
    return sql.SQL("").join(
        sql.SQL("UNLISTEN {};").format(sql.Identifier(validate_channel(c))) for c in channels
    )
