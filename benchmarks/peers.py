"""The job-queue peers side by side: procrastinate, pgqueuer and pgpubsub (the migration guides).

    python -m pip install -e '.[bench,peers]'
    python benchmarks/peers.py [--n 5000]

Uses ``$PGPUBSUB_DSN`` or starts an embedded server. Each library, on a fresh
database of its own: N jobs enqueued in one batch, then one worker in this
process (each library's default concurrency) drains them; every job inserts
one row. Rate = N / (worker start to last row). Then the rows are counted:
lost and duplicated must both be 0. pgpubsub's row is written in the claim
transaction (exactly once); the peers' jobs write it on a connection of their
own (at least once), as their documents do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgpubsub
from pgpubsub.channel import Channel
from pgpubsub.durable import connection, migrate
from pgpubsub.listen import Registry
from pgpubsub.worker import Worker


@contextmanager
def database(admin: str, name: str) -> Iterator[str]:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(admin, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE effects (n int)")
    try:
        yield dsn
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def conninfo_to_url(dsn: str) -> str:
    p = conninfo_to_dict(dsn)
    where = f"{p.get('host', '')}:{p.get('port', 5432)}"
    return f"postgresql://{p.get('user', '')}@{where}/{p['dbname']}"


def effects(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT n) FROM effects").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def bench_procrastinate(dsn: str, n: int) -> float:
    from procrastinate import App, PsycopgConnector

    app = App(connector=PsycopgConnector(conninfo=dsn))
    writer = psycopg.connect(dsn, autocommit=True)  # one connection for every job's row

    @app.task(queue="bench")
    def job(n: int) -> None:
        writer.execute("INSERT INTO effects (n) VALUES (%s)", (n,))

    with app.open():
        app.schema_manager.apply_schema()
        job.batch_defer(*({"n": i} for i in range(n)))
    started = time.perf_counter()
    app.run_worker(queues=["bench"], wait=False)
    took = time.perf_counter() - started
    writer.close()
    return took


BATCH = 10


def bench_pgqueuer(dsn: str, n: int) -> float:
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.domain.types import QueueExecutionMode
    from pgqueuer.models import Job
    from pgqueuer.queries import Queries

    async def main() -> float:
        import asyncpg  # pgqueuer's documented driver

        conn = await asyncpg.connect(conninfo_to_url(dsn))
        driver = AsyncpgDriver(conn)
        queries = Queries(driver)
        await queries.install()
        pgq = PgQueuer(driver)
        writer = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

        @pgq.entrypoint("job")
        async def job(j: Job) -> None:
            await writer.execute(
                "INSERT INTO effects (n) VALUES (%s)", (json.loads(j.payload or b"0"),)
            )

        await queries.enqueue(["job"] * n, [str(i).encode() for i in range(n)], [0] * n)
        started = time.perf_counter()
        await pgq.run(mode=QueueExecutionMode.drain, batch_size=BATCH)
        took = time.perf_counter() - started
        await writer.close()
        await conn.close()
        return took

    return asyncio.run(main())


@dataclass
class PeerJob(Channel, name="peer_job", lock_notifications=True):
    n: int


def bench_pgpubsub(dsn: str, n: int) -> float:
    migrate(dsn)
    registry = Registry()

    def job(n: int) -> None:
        connection().execute("INSERT INTO effects (n) VALUES (%s)", (n,))

    registry.add(PeerJob, job)
    with psycopg.connect(dsn) as conn:
        pgpubsub.notify_many(PeerJob, [{"n": i} for i in range(n)], conn=conn)

    async def main() -> float:
        worker = Worker(dsn, registry=registry, register=False)
        started = time.perf_counter()
        await worker.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            while True:
                row = conn.execute("SELECT count(*) FROM effects").fetchone()
                if row is not None and row[0] >= n:
                    break
                await asyncio.sleep(0.005)
        took = time.perf_counter() - started
        await worker.stop()
        return took

    return asyncio.run(main())


BENCHES: dict[str, Callable[[str, int], float]] = {
    "procrastinate": bench_procrastinate,
    "pgqueuer": bench_pgqueuer,
    "pgpubsub": bench_pgpubsub,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    admin = os.environ.get("PGPUBSUB_DSN")
    server = None
    if not admin:
        from pgpubsub.embedded import EmbeddedServer

        server = EmbeddedServer(prepare=False).start()
        admin = server.conninfo
    try:
        print(f"{args.n:,} jobs, one worker, one row per job")
        print("| library | jobs/s | lost | duplicated |")
        print("|---|---:|---:|---:|")
        for name, bench in BENCHES.items():
            with database(admin, f"bench_peer_{name}") as dsn:
                took = bench(dsn, args.n)
                rows, distinct = effects(dsn)
            print(f"| {name} | {args.n / took:,.0f} | {args.n - distinct} | {rows - distinct} |")
            sys.stdout.flush()
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
