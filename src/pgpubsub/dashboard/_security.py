"""Who may see the dashboard, and what a page may do in a browser.

* :class:`Guard` (ASGI middleware) answers every request:
  - with a token, only requests that carry it (``Authorization: Bearer``,
    basic auth with the token as password, or the cookie that ``?token=``
    sets once) get past it; with a user and password, only basic auth with
    both; others get 401 and the browser asks;
  - with ``allowed_hosts`` (a local bind without a token), a request whose
    ``Host`` is another name is refused: a web page cannot reach a local
    dashboard through DNS rebinding;
  - every response forbids inline scripts, framing and sniffing (a payload
    that got past escaping still could not run).
* Actions are POST forms carrying :func:`csrf_token`, checked by
  :func:`check_csrf`, and a cross-site ``Origin`` is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

__all__ = ["LOCAL_HOSTS", "Guard", "check_csrf", "csrf_token", "new_secret"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
TOKEN_COOKIE = "pgpubsub_dashboard"
HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


def _secret_digest(secret: str, purpose: str) -> str:
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def csrf_token(secret: str) -> str:
    """The value every action form carries (derived from the dashboard's secret)."""
    return _secret_digest(secret, "csrf")


def check_csrf(secret: str, form_value: object, headers: Any) -> str | None:
    """Why a POST must be refused, or None: a missing or wrong token, or another origin."""
    if not isinstance(form_value, str) or not hmac.compare_digest(form_value, csrf_token(secret)):
        return "the form's CSRF token is missing or wrong: reload the page and try again"
    origin = headers.get("origin")
    if origin and origin != "null":
        host = headers.get("host", "")
        if origin.split("://", 1)[-1] != host:
            return f"cross-origin request from {origin} refused"
    return None


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        secret: str,
        allowed_hosts: frozenset[str] | None = None,
        basic_auth: tuple[str, str] | None = None,
    ):
        self.app = app
        self.token = token
        self.basic_auth = basic_auth
        self.cookie = _secret_digest(secret, f"session:{token}") if token else ""
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        async def secured(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        if self.allowed_hosts is not None:
            host = _hostname(headers.get("host", ""))
            if host not in self.allowed_hosts:
                text = f"unknown host {host!r}: open the dashboard as localhost"
                await _plain(secured, 421, text)
                return
        if self.token:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            if "token" in query and hmac.compare_digest(query["token"], self.token):
                await self._login(scope, query, secured)
                return
        if (self.token or self.basic_auth) and not self._authorised(headers):
            how = (
                "open it with ?token=..., or sign in with any user name and the token as password"
                if self.token
                else "sign in with its user name and password"
            )
            await _plain(
                secured,
                401,
                f"this dashboard needs credentials: {how}",
                [(b"www-authenticate", b'Basic realm="pgpubsub dashboard"')],
            )
            return
        await self.app(scope, receive, secured)

    def _authorised(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and self.token:
            return hmac.compare_digest(value.strip(), self.token)
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            if self.basic_auth is not None:
                want_user, want_password = self.basic_auth
                # Both compared, whichever differs: no timing hint of which one.
                same_user = hmac.compare_digest(user, want_user)
                if hmac.compare_digest(password, want_password) and same_user:
                    return True
            return self.token is not None and hmac.compare_digest(password, self.token)
        if not self.token:
            return False
        cookies: SimpleCookie = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except Exception:
            return False
        sent = cookies.get(TOKEN_COOKIE)
        return sent is not None and hmac.compare_digest(sent.value, self.cookie)

    async def _login(self, scope: Scope, query: dict[str, str], send: Send) -> None:
        """``?token=`` once: a cookie for the following requests, and the URL without it."""
        del query["token"]
        root = scope.get("root_path", "") or "/"
        location = scope["path"]  # the whole path, mount point included
        if query:
            location += "?" + urlencode(query)
        cookie = f"{TOKEN_COOKIE}={self.cookie}; Path={root}; HttpOnly; SameSite=Strict"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"set-cookie", cookie.encode("latin-1")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})


def _hostname(host: str) -> str:
    """The name in a Host header, without the port (``[::1]:8089`` is ``[::1]``)."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0]


async def _plain(
    send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})


def new_secret() -> str:
    return secrets.token_hex(32)
