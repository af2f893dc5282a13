"""Listeners run by `pgpubsub listen` in the CLI tests: each records its effect in a table."""

from __future__ import annotations

import os

import psycopg

import pgpubsub
from app.channels import Created, Deleted, Optionals


def record(kind: str, n: int) -> None:
    with psycopg.connect(os.environ["PGPUBSUB_DSN"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO effects (kind, n, pid) VALUES (%s, %s, %s)", (kind, n, os.getpid())
        )


@pgpubsub.listener(Created)
def on_created(n: int) -> None:
    if os.environ.get("SLOW_HANDLER"):
        import time

        time.sleep(float(os.environ["SLOW_HANDLER"]))
    record("created", n)


@pgpubsub.listener(Deleted)
async def on_deleted(n: int) -> None:
    record("deleted", n)


@pgpubsub.listener(Optionals)
def on_optionals(required: int) -> None:
    record("optionals", required)
