"""The dashboard's pages, its live tail and its actions (a Starlette application)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlencode

import jinja2
import markupsafe
import psycopg
import psycopg_pool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import driver
from .. import messages as stored
from ..health import age, since
from ._data import EXACT_UP_TO, ChannelRow, Reader
from ._live import SAMPLE_EVERY, Rates, Watcher
from ._requests import (
    HTTPError,
    channel_param,
    one,
    optional_channel,
    parse_ids,
    read_form,
    url,
)
from ._security import Guard, check_csrf, csrf_token, new_secret

__all__ = ["Dashboard", "create_app"]

log = logging.getLogger("pgpubsub.dashboard")
T = TypeVar("T")

HERE = pathlib.Path(__file__).parent
PARTIAL = "x-pgpubsub-partial"  # the live refresh asks for the changing part only
APPLICATION = "pgpubsub dashboard"  # application_name of every connection it opens
LIVE = ("overview", "workers", "channel")  # pages with a part that refreshes itself


def sparkline(values: list[float | None], peak: float, width: int = 120, height: int = 28) -> str:
    """SVG polyline points of ``values`` (None: not known, the line skips it)."""
    if not values:
        return ""
    step = width / max(1, len(values) - 1)
    return " ".join(
        f"{i * step:.1f},{height - 1 - (v / peak if peak else 0) * (height - 2):.1f}"
        for i, v in enumerate(values)
        if v is not None
    )


class Dashboard:
    """State shared by the requests: the reader, the LISTEN watcher, the rate history."""

    def __init__(self, conninfo: str, *, allow_actions: bool, secret: str):
        self.conninfo = conninfo
        self.allow_actions = allow_actions
        self.secret = secret
        self.reader = Reader(conninfo, application=APPLICATION)
        self.watcher = Watcher(conninfo, application=APPLICATION)
        self.rates = Rates()
        self._sampler: asyncio.Task[None] | None = None
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every value is text in the page, never markup
            undefined=jinja2.StrictUndefined,
        )
        env.globals.update(age=age, since=since, sparkline=sparkline, exact_up_to=EXACT_UP_TO)
        self.env = env

    async def ensure_started(self) -> None:
        """Open the pool, the LISTEN connection and the sampler (once, at the first request)."""
        if self._sampler is None:  # set before any await: concurrent first requests start once
            self._sampler = asyncio.get_running_loop().create_task(self._sample())
            self.watcher.start()
            await self.reader.open()

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await self.watcher.stop()
            await self.reader.close()

    async def _sample(self) -> None:
        await self.reader.open()
        while True:
            try:
                overview = await self.reader.overview()
                plain = [c.name for c in overview.channels if c.known_kind and not c.durable]
                await self.watcher.count(plain)
                self.rates.add(time.monotonic(), overview.channels, self.watcher.notified)
            except Exception as exc:  # the database is away: the pages say so
                log.debug("dashboard: sampling failed: %s", exc)
            await asyncio.sleep(SAMPLE_EVERY)

    # -- rendering -------------------------------------------------------------

    def render(
        self, request: Request, template: str, http_status: int = 200, **context: Any
    ) -> Response:
        partial = request.headers.get(PARTIAL) == "1" and template in LIVE
        name = f"_{template}_live.html" if partial else f"{template}.html"
        html = self.env.get_template(name).render(
            request=request,
            url=lambda route, **params: url(request, route, **params),
            csrf=csrf_token(self.secret),
            allow_actions=self.allow_actions,
            notice=request.query_params.get("notice", ""),
            page=template,
            **context,
        )
        return HTMLResponse(html, http_status, headers={"cache-control": "no-store"})

    def chart(self, row: ChannelRow) -> dict[str, Any]:
        published, processed = self.rates.series(row.name)
        peak = max([v for v in (*published, *processed) if v is not None] or [0.0])
        return {
            "published": published,
            "processed": processed,
            "peak": peak,
            "now_processed": processed[-1] if processed else None,
            "now_published": published[-1] if published else None,
        }

    # -- pages -----------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        data = await self.reader.overview()
        charts = {c.name: self.chart(c) for c in data.channels}
        alive = [w for w in data.workers if w.alive]
        return self.render(
            request,
            "overview",
            overview=data,
            charts=charts,
            alive=alive,
        )

    async def workers(self, request: Request) -> Response:
        return self.render(request, "workers", workers=await self.reader.workers())

    async def channel(self, request: Request) -> Response:
        name = channel_param(request, "name")
        status = request.query_params.get("status") or ""
        row = await self.reader.channel(name)
        if not status:
            status = "dead" if row.dead.value else "pending"
        if status not in stored.STATUSES:
            raise HTTPError(400, f"unknown status {status!r}: one of {', '.join(stored.STATUSES)}")
        return self.render(
            request,
            "channel",
            channel=name,
            status=status,
            counts=row,
            kind=row.kind if row.known_kind else None,
            messages=await self.reader.messages(name, status),
            statuses=stored.STATUSES,
        )

    async def message(self, request: Request) -> Response:
        message_id = request.path_params["id"]
        msg = await self.reader.message(message_id)
        if msg is None:
            raise HTTPError(404, f"no stored message with id {message_id}")
        return self.render(
            request,
            "message",
            message=msg,
            payload=_pretty(msg.payload),
            context_text=json.dumps(msg.context, indent=2) if msg.context is not None else "",
        )

    async def tail(self, request: Request) -> Response:
        name = await self._known_channel(request)
        return self.render(request, "tail", channel=name)

    async def tail_events(self, request: Request) -> Response:
        name = await self._known_channel(request)
        tail = await self.watcher.open_tail(name)

        async def stream() -> Any:
            try:
                yield "event: ready\ndata: {}\n\n"
                while True:
                    lines, dropped = await tail.take(timeout=15.0)
                    if not lines and not dropped:
                        yield ": keep-alive\n\n"
                        continue
                    data = {"lines": [[ln.at, ln.payload] for ln in lines], "dropped": dropped}
                    yield f"data: {json.dumps(data)}\n\n"
                    await asyncio.sleep(0.05)  # at most 20 events a second: lines are batched
            finally:
                await self.watcher.close_tail(tail)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _known_channel(self, request: Request) -> str:
        """A channel the workers or the stored messages name: nothing else is LISTENed to."""
        name = channel_param(request, "channel")
        workers = await self.reader.workers()
        if any(name in w.channels for w in workers) or name in await self.reader.channel_names():
            return name
        raise HTTPError(
            404,
            f"unknown channel {name!r}: a channel is known once a worker listens to it "
            "or it has stored messages",
        )

    # -- actions ---------------------------------------------------------------

    async def action(self, request: Request) -> Response:
        if not self.allow_actions:
            raise HTTPError(403, "actions are disabled: start the dashboard with --allow-actions")
        form = await read_form(request)
        refused = check_csrf(self.secret, one(form, "csrf"), request.headers)
        if refused:
            raise HTTPError(403, refused)
        action = request.path_params["action"]
        channel = optional_channel(one(form, "channel"))
        ids = parse_ids(form.get("id", []))
        status = one(form, "status") or "dead"
        if ids is None and channel is None:
            raise HTTPError(400, "an action needs message ids or a channel")
        if action in ("pause", "resume"):
            if channel is None:
                raise HTTPError(400, f"{action} needs a channel")
            name = channel
            if action == "pause":
                changed = await self._run(lambda c: stored.pause(c, name))
                notice = "paused: no worker starts its messages" if changed else "already paused"
            else:
                changed = await self._run(lambda c: stored.resume(c, name))
                notice = "resumed" if changed else "was not paused"
        elif action == "replay":
            # A message by id: dead, or pending ("run now"); a whole channel: its dead ones.
            which = ("dead", "pending") if ids else ("dead",)
            notice = _replay_notice(
                await self._run(lambda c: stored.replay(c, ids, channel, which))
            )
        elif action == "cancel":
            result = await self._run(lambda c: stored.cancel(c, ids, channel))
            notice = f"{int(result)} pending message(s) cancelled" + (
                f"; {len(result.stopping)} running asked to stop" if result.stopping else ""
            )
        elif action == "purge":
            if status not in ("dead", "done", "spill"):
                raise HTTPError(400, "only dead, done or spill messages can be purged")
            if one(form, "confirm") != "yes":
                count = await self._run(lambda c: stored.count(c, [status], channel, ids=ids))
                return self.render(
                    request, "confirm", n=count, status=status, channel=channel, ids=ids or []
                )
            purged = await self._run(lambda c: stored.purge(c, status, channel, ids=ids))
            notice = f"{purged} {status} message(s) deleted"
        else:
            raise HTTPError(404, f"no action {action!r}: replay, cancel, purge, pause or resume")
        if channel is not None:
            target = url(request, "channel", name=channel, status=status)
        else:
            target = url(request, "overview")
        sep = "&" if "?" in target else "?"
        return RedirectResponse(f"{target}{sep}{urlencode({'notice': notice})}", 303)

    async def _run(self, fn: Callable[[Any], T]) -> T:
        """One operation of :mod:`pgpubsub.messages`, committed (as ``pgpubsub messages``),
        run again after a serialization failure (its transaction is the dashboard's)."""

        def run() -> T:
            with psycopg.connect(
                self.conninfo, connect_timeout=5, application_name=APPLICATION
            ) as conn:
                result = fn(conn)
                conn.commit()
                return result

        return await asyncio.to_thread(stored.in_own_transaction, run)


#: Skipped messages named in a replay's notice (the rest are counted).
NOTICE_SKIPPED = 5


def _replay_notice(result: stored.ReplayResult) -> str:
    """What a replay did, for the page: each message it could not replay, with why."""
    notice = f"{len(result.replayed)} message(s) will run again"
    if result.skipped:
        shown = [f"{s.id}: {s.reason}" for s in result.skipped[:NOTICE_SKIPPED]]
        more = len(result.skipped) - len(shown)
        notice += f"; {len(result.skipped)} not replayed ({'; '.join(shown)}"
        notice += f"; and {more} more)" if more else ")"
    return notice


def _pretty(payload: str) -> str:
    try:
        return json.dumps(json.loads(payload), indent=2, ensure_ascii=False)
    except ValueError:
        return payload


def _handler(
    dashboard: Dashboard, method: Callable[[Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """Start the dashboard on first use; show failures as pages, never as tracebacks."""

    async def handle(request: Request) -> Response:
        await dashboard.ensure_started()
        try:
            return await method(request)
        except HTTPError as exc:
            return _error(dashboard, request, exc.status, str(exc))
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
            text = f"the database is unreachable ({driver.one_line(exc)}); retrying"
            return _error(dashboard, request, 503, text)
        except psycopg.errors.UndefinedTable:
            text = "the pgpubsub schema is missing: run `pgpubsub migrate`"
            return _error(dashboard, request, 503, text)
        except psycopg.errors.InsufficientPrivilege as exc:
            text = (
                f"{driver.one_line(exc)}: `pgpubsub grant ROLE --monitor` lets a role see counts"
                " and workers, `--operator` read messages and act on them"
            )
            return _error(dashboard, request, 403, text)
        except psycopg.Error as exc:  # anything else the database says: one line, logged
            log.exception("dashboard: %s %s failed", request.method, request.url.path)
            return _error(dashboard, request, 500, f"the database refused: {driver.one_line(exc)}")

    return handle


def _error(dashboard: Dashboard, request: Request, status: int, text: str) -> Response:
    if request.headers.get(PARTIAL) == "1":
        return HTMLResponse(f'<p class="problem">{markupsafe.escape(text)}</p>', status)
    return dashboard.render(request, "error", status, problem=text, retry=status == 503)


def create_app(
    dsn: str = "",
    *,
    allow_actions: bool = False,
    token: str | None = None,
    basic_auth: tuple[str, str] | None = None,
    allowed_hosts: frozenset[str] | None = None,
) -> Any:
    """The dashboard as an ASGI application, to serve or to mount in another one.

    ``allow_actions`` enables replay, cancel, purge, pause and resume; ``token`` makes every
    request prove it knows it (give one whenever the dashboard is reachable
    from other machines); ``basic_auth=(user, password)`` asks for those
    instead, or as well; ``allowed_hosts`` refuses requests for other host
    names (``pgpubsub dashboard`` sets it for a local bind).
    """
    dashboard = Dashboard(
        driver.build_conninfo(dsn), allow_actions=allow_actions, secret=new_secret()
    )
    page = {
        name: _handler(dashboard, getattr(dashboard, name))
        for name in ("overview", "workers", "channel", "message", "tail", "tail_events", "action")
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        yield
        await dashboard.close()

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", page["overview"]),
            Route("/workers", page["workers"]),
            Route("/channel", page["channel"]),
            Route("/message/{id:int}", page["message"]),
            Route("/tail", page["tail"]),
            Route("/tail/events", page["tail_events"]),
            Route("/actions/{action}", page["action"], methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static")),
        ],
    )
    return Guard(
        app,
        token=token,
        secret=dashboard.secret,
        allowed_hosts=allowed_hosts,
        basic_auth=basic_auth,
    )
