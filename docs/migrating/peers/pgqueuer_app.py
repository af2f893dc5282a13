"""The welcome-email job app, written for pgqueuer (docs/migrating/pgqueuer.md).

Run by tests/test_peers.py with pgqueuer installed from the package index.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import psycopg
from pgqueuer import PgQueuer
from pgqueuer.db import AsyncpgDriver
from pgqueuer.domain.types import QueueExecutionMode
from pgqueuer.models import Job
from pgqueuer.queries import Queries


async def main(dsn: str) -> list[int]:
    """``dsn``: a postgresql:// URL (asyncpg takes no key=value strings)."""
    connection = await asyncpg.connect(dsn)  # pgqueuer's documented driver
    driver = AsyncpgDriver(connection)
    queries = Queries(driver)
    await queries.install()  # `pgq install`
    pgq = PgQueuer(driver)
    writer = await asyncpg.create_pool(dsn)  # the jobs' own connections (jobs run concurrently)

    @pgq.entrypoint("send_welcome")
    async def send_welcome(job: Job) -> None:
        user_id = json.loads(job.payload or b"{}")["user_id"]  # payloads are bytes
        # Its own transaction: the job's completion is logged later, apart from it.
        await writer.execute("INSERT INTO sent (user_id) VALUES ($1)", user_id)

    await queries.enqueue("send_welcome", json.dumps({"user_id": 1}).encode())
    for _ in range(2):  # the second is skipped: a job with this dedupe key is queued
        await queries.enqueue(
            "send_welcome",
            json.dumps({"user_id": 2}).encode(),
            dedupe_key="welcome-2",
            on_conflict="skip",
        )
    await pgq.run(mode=QueueExecutionMode.drain)  # until the queue is empty
    await writer.close()
    await connection.close()
    with psycopg.connect(dsn) as conn:
        return sorted(row[0] for row in conn.execute("SELECT user_id FROM sent"))


def run(dsn: str) -> list[int]:
    return asyncio.run(main(dsn))
