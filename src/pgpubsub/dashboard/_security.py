"""Who may see the dashboard, and what a page may do in a browser.

* :class:`Guard` (ASGI middleware) answers every request (HTTP only: a
  websocket is refused, the lifespan passes through):
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

Every secret is compared as UTF-8 bytes in constant time (a token or password
may be any text), and every malformed value (not UTF-8, NUL, bad base64, no
colon, huge, empty) is simply a wrong one: a 401 or 403, never a crash. The
redirect of a ``?token=`` login is a path under the mount point, whatever
path the request had: never ``//host``, a scheme or a way out with ``..``.
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
from urllib.parse import parse_qsl, quote, urlencode

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


def _utf8(text: str | bytes) -> bytes:
    """The bytes of ``text`` as a client sends them (any str, lone surrogates included)."""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")


def _same(given: str | bytes, expected: str | bytes) -> bool:
    """Whether ``given`` is the secret ``expected``: constant-time, never an exception.

    ``hmac.compare_digest`` refuses a ``str`` with non-ASCII characters, so
    both sides are compared as UTF-8 bytes.
    """
    return hmac.compare_digest(_utf8(given), _utf8(expected))


def _secret_digest(secret: str, purpose: str) -> str:
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def csrf_token(secret: str) -> str:
    """The value every action form carries (derived from the dashboard's secret)."""
    return _secret_digest(secret, "csrf")


def check_csrf(secret: str, form_value: object, headers: Any) -> str | None:
    """Why a POST must be refused, or None: a missing or wrong token, or another origin.

    Any value that is not the token (absent, empty, not text, any characters,
    any length) is simply wrong.
    """
    if not isinstance(form_value, (str, bytes)) or not _same(form_value, csrf_token(secret)):
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
        if scope["type"] == "lifespan":  # the server starting and stopping the application
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # The dashboard has no websocket: none is checked, so none gets past.
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            raise ValueError(f"the dashboard serves HTTP, not {scope['type']!r}")
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
            query = _query(scope.get("query_string", b""))
            if b"token" in query and _same(query[b"token"], self.token):
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
        # Headers were decoded as latin-1: encoding them back gives the bytes sent.
        auth = headers.get("authorization", "").encode("latin-1")
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer" and self.token:
            return _same(value.strip(), self.token)
        if scheme.lower() == b"basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            user, colon, password = decoded.partition(b":")
            if not colon:
                return False
            if self.basic_auth is not None:
                want_user, want_password = self.basic_auth
                # Both compared, whichever differs: no timing hint of which one.
                same_user = _same(user, want_user)
                if _same(password, want_password) and same_user:
                    return True
            return self.token is not None and _same(password, self.token)
        if not self.token:
            return False
        cookies: SimpleCookie = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except Exception:
            return False
        sent = cookies.get(TOKEN_COOKIE)
        return sent is not None and _same(sent.value, self.cookie)

    async def _login(self, scope: Scope, query: dict[bytes, bytes], send: Send) -> None:
        """``?token=`` once: a cookie for the following requests, and the URL without it."""
        del query[b"token"]
        root = scope.get("root_path", "") or "/"
        location = _page(root, scope["path"])
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


def _query(query_string: bytes) -> dict[bytes, bytes]:
    """The parameters of a query string as the bytes sent, percent-decoded (any bytes)."""
    # latin-1 maps each byte to one character and back: nothing is lost or refused.
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return {k.encode("latin-1"): v.encode("latin-1") for k, v in pairs}


def _page(root: str, path: str) -> str:
    """The dashboard page ``path`` names, as a path under ``root`` no browser reads otherwise.

    ``path`` is the request's (mount point included, percent-decoded): any
    text. Backslashes count as slashes (browsers read them so), empty, ``.``
    and ``..`` segments are dropped and the rest is percent-encoded (controls
    and non-ASCII too), so the result starts with
    ``root`` and one slash: never ``//other.host``, ``/\\other.host`` or a
    scheme, and no way up out of the mount point.
    """
    base = "/" + root.strip("/") if root.strip("/") else ""
    if path.startswith(base + "/") or path == base:
        path = path[len(base) :]  # the ASGI path includes the mount point
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    trailing = "/" if parts and path.endswith("/") else ""
    return base + "/" + "/".join(quote(p, safe="") for p in parts) + trailing


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
