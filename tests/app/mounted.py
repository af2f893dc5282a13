"""An existing ASGI application that mounts the dashboard under /ops/queues."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from pgpubsub.dashboard import create_app


async def home(request: object) -> PlainTextResponse:
    return PlainTextResponse("the host application")


app = Starlette(
    routes=[
        Route("/", home),
        Mount("/ops/queues", create_app(os.environ["PGPUBSUB_DSN"], allow_actions=True)),
    ]
)
