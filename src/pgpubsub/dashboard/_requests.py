"""What the dashboard takes from a request: checked parameters, forms, and its own URLs.

Channels and ids from a request are only ever values (bound parameters, or a
LISTEN of a channel the dashboard already knows): a name is checked as a
channel name and an id as a number, or the request gets a 400.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from starlette.requests import Request

from ..errors import InvalidChannelName
from ..names import validate_channel

__all__ = [
    "HTTPError",
    "channel_param",
    "one",
    "optional_channel",
    "parse_ids",
    "read_form",
    "url",
]

MAX_FORM = 64 * 1024
MAX_ID = 2**63 - 1  # pgpubsub.message.id is a bigint


class HTTPError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


PATHS = {
    "overview": "/",
    "workers": "/workers",
    "channel": "/channel",
    "message": "/message/{id}",
    "tail": "/tail",
    "tail_events": "/tail/events",
    "action": "/actions/{action}",
    "static": "/static/{path}",
}


def url(request: Request, route: str, **params: Any) -> str:
    """The path of a route under the mount point (``root_path``), with query parameters."""
    path = PATHS[route]
    for key in ("id", "action", "path"):
        if "{" + key + "}" in path:
            path = path.replace("{" + key + "}", quote(str(params.pop(key)), safe=""))
    url = request.scope.get("root_path", "").rstrip("/") + path
    query = {k: v for k, v in params.items() if v is not None}
    return f"{url}?{urlencode(query)}" if query else url


async def read_form(request: Request) -> dict[str, list[str]]:
    """The fields of an action's form (url-encoded, a few short fields).

    Bytes that are not UTF-8 are kept (as lone surrogates), not refused: the
    CSRF check comes first and finds such a token wrong (403), and a channel
    name or id with them is then a 400 of its own.
    """
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise HTTPError(413, f"a form of more than {MAX_FORM} bytes")
    try:
        text = body.decode("utf-8", "surrogateescape")
        return parse_qs(text, keep_blank_values=True, max_num_fields=1000)
    except ValueError as exc:  # too many fields
        raise HTTPError(400, f"unreadable form: {exc}") from None


def one(form: dict[str, list[str]], key: str) -> str | None:
    values = form.get(key)
    return values[0] if values else None


def channel_param(request: Request, key: str) -> str:
    try:
        return validate_channel(request.query_params.get(key, ""))
    except InvalidChannelName as exc:
        raise HTTPError(400, str(exc)) from None


def optional_channel(value: object) -> str | None:
    if value in (None, ""):
        return None
    try:
        return validate_channel(value)
    except InvalidChannelName as exc:
        raise HTTPError(400, str(exc)) from None


def parse_ids(values: list[str]) -> list[int] | None:
    ids = []
    for value in values:
        for part in str(value).replace(",", " ").split():
            # ASCII digits only ("²".isdigit() is true), and within bigint.
            if not (part.isascii() and part.isdigit()) or int(part) > MAX_ID:
                raise HTTPError(400, f"message id {part!r} is not a message id")
            ids.append(int(part))
    return ids or None
