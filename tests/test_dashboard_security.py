"""The dashboard's guard against hostile requests, driven as an ASGI application in-process.

No browser and no server: each test hands the application the ASGI messages a
server would (lifespan startup, one or more requests, lifespan shutdown) and
looks at what it answers. A crash inside the application is answered here as
a 500 with its traceback as the body, as a server would log it.
"""

from __future__ import annotations

import asyncio
import base64
import traceback
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest

pytest.importorskip("starlette")

from pgpubsub.dashboard import create_app  # noqa: E402
from pgpubsub.dashboard._security import Guard  # noqa: E402

TOKEN = "s3cret"
STATIC = "/static/dashboard.css"  # an authorised request for it needs no database


@dataclass
class Request:
    path: str = "/"
    method: str = "GET"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    query: bytes = b""
    body: bytes = b""
    root_path: str = ""
    type: str = "http"


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    messages: list[MutableMapping[str, Any]] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


async def _call(app: Any, request: Request) -> Response:
    response = Response()
    done = asyncio.Event()
    sent_body = False
    root = request.root_path
    scope = {
        "type": request.type,
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http" if request.type == "http" else "ws",
        "path": root + request.path,  # the whole path, mount point included
        "raw_path": (root + request.path).encode("utf-8"),
        "root_path": root,
        "query_string": request.query,
        "headers": [(b"host", b"127.0.0.1:8089"), *request.headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8089),
    }

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent_body
        if request.type == "websocket":
            if not sent_body:
                sent_body = True
                return {"type": "websocket.connect"}
            await done.wait()
            return {"type": "websocket.disconnect", "code": 1000}
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        response.messages.append(message)
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            response.body += message.get("body", b"")
            if not message.get("more_body"):
                done.set()
        elif message["type"] in ("websocket.close", "websocket.accept"):
            done.set()

    try:
        await app(scope, receive, send)
    except Exception:  # what a server logs as a traceback and answers with a 500
        return Response(500, body=traceback.format_exc().encode())
    return response


def serve(app: Any, *requests: Request) -> list[Response]:
    """The application's answers to ``requests``, between a lifespan startup and shutdown."""

    async def run() -> list[Response]:
        inbox: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
        outbox: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        lifespan = asyncio.ensure_future(app(scope, inbox.get, outbox.put))

        async def event(name: str) -> None:
            await inbox.put({"type": f"lifespan.{name}"})
            answer = await asyncio.wait_for(outbox.get(), timeout=10)
            assert answer["type"] == f"lifespan.{name}.complete", answer

        await event("startup")
        try:
            return [await _call(app, r) for r in requests]
        finally:
            await event("shutdown")
            await asyncio.wait_for(lifespan, timeout=10)

    return asyncio.run(run())


def one(app: Any, request: Request) -> Response:
    return serve(app, request)[0]


def auth(value: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", value)]


def basic(credentials: bytes) -> list[tuple[bytes, bytes]]:
    return auth(b"Basic " + base64.b64encode(credentials))


def refused(response: Response, *statuses: int) -> bool:
    return response.status in (statuses or (401,))


@pytest.fixture
def with_token() -> Any:
    return create_app("dbname=unused", token=TOKEN)


# -- credentials: malformed values are a 401, never a 500 ---------------------


def test_a_non_ascii_bearer_token_is_a_401(with_token: Any) -> None:
    answer = one(with_token, Request(headers=auth("Bearer sécret".encode())))
    assert answer.status == 401, answer.body.decode()


def test_a_non_ascii_basic_auth_password_is_a_401(with_token: Any) -> None:
    answer = one(with_token, Request(headers=basic("ops:sécret".encode())))
    assert answer.status == 401, answer.body.decode()


def test_non_ascii_bytes_in_basic_auth_base64_are_a_401(with_token: Any) -> None:
    answer = one(with_token, Request(headers=auth("Basic é==".encode())))
    assert answer.status == 401, answer.body.decode()


def test_a_non_ascii_session_cookie_is_a_401(with_token: Any) -> None:
    cookie = [(b"cookie", b'pgpubsub_dashboard="\\351t\\351"')]  # a quoted "été"
    answer = one(with_token, Request(headers=cookie))
    assert answer.status == 401, answer.body.decode()


def test_a_non_ascii_login_token_is_a_401(with_token: Any) -> None:
    answer = one(with_token, Request(query=b"token=s%C3%A9cret"))
    assert answer.status == 401, answer.body.decode()


MALFORMED = {
    "bearer non-ascii": auth("Bearer sécret".encode()),
    "bearer latin-1 byte": auth(b"Bearer s\xe9cret"),
    "bearer nul": auth(b"Bearer s3cret\x00"),
    "bearer empty": auth(b"Bearer "),
    "bearer huge": auth(b"Bearer " + b"s" * 1_000_000),
    "scheme only": auth(b"Basic"),
    "basic bad base64": auth(b"Basic !!!not-base64"),
    "basic base64 non-ascii": auth("Basic é==".encode()),
    "basic not utf-8": basic(b"ops:\xff\xfe"),
    "basic non-ascii": basic("öps:sëcret".encode()),
    "basic nul": basic(b"ops:s3cret\x00"),
    "basic missing colon": basic(b"s3cret"),
    "basic empty": basic(b""),
    "basic empty password": basic(b"ops:"),
    "basic huge": basic(b"ops:" + b"s" * 1_000_000),
    "cookie non-ascii": [(b"cookie", b"pgpubsub_dashboard=\xe9t\xe9")],
    "cookie quoted non-ascii": [(b"cookie", b'pgpubsub_dashboard="\\351t\\351"')],
    "cookie nul": [(b"cookie", b"pgpubsub_dashboard=a\x00b")],
    "cookie huge": [(b"cookie", b"pgpubsub_dashboard=" + b"a" * 1_000_000)],
}


@pytest.mark.parametrize("headers", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("secret", ["token", "basic", "non-ascii basic"])
def test_every_malformed_credential_is_a_401(
    headers: list[tuple[bytes, bytes]], secret: str
) -> None:
    app = {
        "token": lambda: create_app("dbname=unused", token=TOKEN),
        "basic": lambda: create_app("dbname=unused", basic_auth=("ops", TOKEN)),
        "non-ascii basic": lambda: create_app("dbname=unused", basic_auth=("öps", "sécret")),
    }[secret]()
    answer = one(app, Request(STATIC, headers=headers))
    assert answer.status == 401, answer.body.decode()[-2000:]


@pytest.mark.parametrize(
    "query",
    [b"token=s%C3%A9cret", b"token=s\xe9cret", b"token=%FF", b"token=%00", b"token=",
     b"token=" + b"s" * 100_000],
)
def test_every_malformed_login_token_is_a_401(with_token: Any, query: bytes) -> None:
    answer = one(with_token, Request(STATIC, query=query))
    assert answer.status == 401, answer.body.decode()[-2000:]


# -- non-ASCII secrets work ---------------------------------------------------


def test_a_non_ascii_basic_auth_password_lets_its_owner_in() -> None:
    app = create_app("dbname=unused", basic_auth=("öps", "pässwörd"))
    right, wrong_user, wrong_password = serve(
        app,
        Request(STATIC, headers=basic("öps:pässwörd".encode())),
        Request(STATIC, headers=basic("ops:pässwörd".encode())),
        Request(STATIC, headers=basic("öps:passwörd".encode())),
    )
    assert right.status == 200, right.body.decode()[-2000:]
    assert (wrong_user.status, wrong_password.status) == (401, 401)


def test_a_non_ascii_token_works_as_bearer_basic_and_login() -> None:
    app = create_app("dbname=unused", token="tökén")
    bearer, basic_password, login = serve(
        app,
        Request(STATIC, headers=auth("Bearer tökén".encode())),
        Request(STATIC, headers=basic("anyone:tökén".encode())),
        Request(STATIC, query=b"token=" + quote("tökén").encode()),
    )
    assert (bearer.status, basic_password.status, login.status) == (200, 200, 303), [
        r.body.decode()[-2000:] for r in (bearer, basic_password, login)
    ]
    cookie = login.header(b"set-cookie")
    assert cookie is not None
    again = one(app, Request(STATIC, headers=[(b"cookie", cookie.split(b";")[0])]))
    assert again.status == 200


# -- the login redirect stays on the dashboard --------------------------------


def _location(path: str, root_path: str = "", query: bytes = b"") -> str:
    app = create_app("dbname=unused", token=TOKEN)
    answer = one(
        app, Request(path, query=b"token=" + TOKEN.encode() + query, root_path=root_path)
    )
    assert answer.status == 303, answer.body.decode()[-2000:]
    location = answer.header(b"location")
    assert location is not None
    return location.decode("latin-1")


def _on_the_dashboard(location: str, root_path: str = "") -> bool:
    """A path under ``root_path`` that no browser reads as another host or a scheme."""
    base = root_path.rstrip("/") + "/"
    rest = location[len(base) :]
    return (
        location.startswith(base)
        and not rest.startswith(("/", "\\"))
        and "\\" not in location
        and all(0x21 <= ord(c) < 0x7F for c in location)  # no controls, spaces or non-ASCII
        and "/../" not in f"/{rest}/"
        and "/./" not in f"/{rest}/"
    )


def test_a_login_on_a_double_slash_path_stays_on_the_dashboard() -> None:
    location = _location("//other.host/")
    assert _on_the_dashboard(location), location


def test_a_login_on_a_backslash_path_stays_on_the_dashboard() -> None:
    location = _location("/\\other.host/")
    assert _on_the_dashboard(location), location


def test_a_login_on_a_non_latin_path_is_a_redirect_not_a_crash() -> None:
    location = _location("/€")
    assert _on_the_dashboard(location), location


@pytest.mark.parametrize(
    "path",
    [
        "//other.host/",
        "///other.host",
        "/\\other.host",
        "/\\/other.host",
        "/ops/queues//other.host",
        "/../../other",
        "/./../x",
        "/workers/\r\nSet-Cookie: x=1",
        "/\t/other.host",
        "/é",
        "",
    ],
)
@pytest.mark.parametrize("root_path", ["", "/ops/queues"])
def test_every_login_redirect_stays_on_the_dashboard(path: str, root_path: str) -> None:
    location = _location(path, root_path, query=b"&status=dead")
    assert _on_the_dashboard(location, root_path), location
    assert location.endswith("?status=dead"), location


def test_a_login_keeps_the_page_and_its_other_parameters() -> None:
    assert _location("/workers") == "/workers"
    assert _location("/channel", query=b"&name=orders") == "/channel?name=orders"
    assert _location("/channel", "/ops/queues", b"&name=a%20b") == (
        "/ops/queues/channel?name=a+b"
    )
    assert _location("/", "/ops/queues") == "/ops/queues/"


# -- CSRF: a malformed form value is a 403, never a 500 ------------------------


def _action(dsn: str, *forms: bytes) -> list[Response]:
    app = create_app(dsn, allow_actions=True)
    form = [(b"content-type", b"application/x-www-form-urlencoded")]
    requests = [
        Request("/actions/replay", "POST", headers=form, body=body) for body in forms
    ]
    return serve(app, *requests)


def test_a_non_ascii_csrf_field_is_a_403(dsn: str) -> None:
    [answer] = _action(dsn, b"channel=orders&csrf=%C3%A9")
    assert answer.status == 403, answer.body.decode()[-2000:]


def test_every_malformed_csrf_field_is_a_403(dsn: str) -> None:
    bodies = {
        "non-ascii": b"channel=orders&csrf=%C3%A9",
        "raw non-ascii": "channel=orders&csrf=é".encode(),
        "not utf-8": b"channel=orders&csrf=%FF",
        "raw not utf-8": b"channel=orders&csrf=\xff",
        "nul": b"channel=orders&csrf=%00",
        "empty": b"channel=orders&csrf=",
        "missing": b"channel=orders",
        "huge": b"channel=orders&csrf=" + b"a" * 60_000,
    }
    answers = _action(dsn, *bodies.values())
    statuses = {name: a.status for name, a in zip(bodies, answers, strict=True)}
    assert statuses == dict.fromkeys(bodies, 403), [a.body.decode()[-600:] for a in answers]


# -- only HTTP reaches the pages ----------------------------------------------


class Recorder:
    """An application behind the guard that notes the kind of every scope it gets."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.seen.append(scope["type"])
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        elif scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    "options",
    [{"token": TOKEN}, {"basic_auth": ("ops", TOKEN)}, {"allowed_hosts": frozenset({"x"})}, {}],
    ids=["token", "basic", "allowed hosts", "open"],
)
def test_a_websocket_never_gets_past_the_guard(options: dict[str, Any]) -> None:
    inner = Recorder()
    guard = Guard(inner, secret="x" * 64, **{"token": None, **options})
    credentials = [(b"authorization", b"Bearer " + TOKEN.encode())]
    [answer] = serve(guard, Request("/", headers=credentials, type="websocket"))
    assert [m["type"] for m in answer.messages] == ["websocket.close"]
    assert inner.seen == ["lifespan"]  # its startup and shutdown passed through


def test_the_dashboard_starts_and_stops_through_the_guard(dsn: str) -> None:
    """The lifespan reaches the application (uvicorn runs it): closing the pool at the end."""
    app = create_app(dsn, token=TOKEN)
    [answer] = serve(app, Request("/workers", headers=auth(b"Bearer " + TOKEN.encode())))
    assert answer.status == 200, answer.body.decode()[-2000:]
