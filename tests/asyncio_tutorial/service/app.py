import contextlib
import os

import psycopg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import pgpubsub

from .tasks import WelcomeEmail

DSN = os.environ["PGPUBSUB_DSN"]


async def signup(request: Request) -> JSONResponse:
    email = (await request.json())["email"]
    async with await psycopg.AsyncConnection.connect(DSN) as conn:  # one transaction:
        await conn.execute("INSERT INTO signup (email) VALUES (%s)", (email,))
        await pgpubsub.anotify(WelcomeEmail(email=email), conn=conn)  # the row and its message
    return JSONResponse({"email": email}, status_code=201)


async def show(request: Request) -> JSONResponse:
    email = request.path_params["email"]
    async with await psycopg.AsyncConnection.connect(DSN) as conn:
        cur = await conn.execute("SELECT welcomed FROM signup WHERE email = %s", (email,))
        row = await cur.fetchone()
    if row is None:
        return JSONResponse({"error": "no such signup"}, status_code=404)
    return JSONResponse({"email": email, "welcomed": row[0]})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS signup"
            " (email text PRIMARY KEY, welcomed bool NOT NULL DEFAULT false)"
        )
    yield


app = Starlette(
    routes=[Route("/signups", signup, methods=["POST"]), Route("/signups/{email}", show)],
    lifespan=lifespan,
)
