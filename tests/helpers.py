"""Small helpers shared by the tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgpubsub._loopthread import LoopThread
from pgpubsub._processor import ChannelProcessor
from pgpubsub.embedded import EmbeddedServer
from pgpubsub.listen import Registry
from pgpubsub.listen import registry as default_registry
from pgpubsub.worker import Worker


@dataclass
class Server:
    admin: str  # superuser conninfo to the maintenance database
    embedded: EmbeddedServer | None

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin, dbname=dbname)

    def admin_execute(self, query: sql.Composable) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(query)

    def version(self) -> int:
        with psycopg.connect(self.admin) as conn:
            return conn.info.server_version


#: src/pgpubsub/sql/schema.sql as version 5 left it (a plain pgpubsub.message table).
SCHEMA_V5 = Path(__file__).parent / "schema_v5.sql"


def install_version_5(dsn: str) -> None:
    """The schema as version 5 installed it: databases that users upgrade."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA_V5.read_text().encode())


def admin_query(dsn: str, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one query on a fresh autocommit connection and return its rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def fast_deadlock_detection(dsn: str) -> None:
    """Deadlocks in ``dsn``'s database found after 50 ms, not PostgreSQL's 1 s."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET deadlock_timeout = '50ms'").format(
                sql.Identifier(conn.info.dbname)
            )
        )


class Racers:
    """Operations racing in threads, each on an autocommit connection of its own: what each
    returned or raised, and whether it waits for a lock another session holds."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.outcomes: dict[str, Any] = {}
        self.pids: dict[str, int] = {}
        self.threads: list[threading.Thread] = []

    def start(self, name: str, work: Callable[[psycopg.Connection[Any]], Any]) -> None:
        def run() -> None:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                self.pids[name] = conn.info.backend_pid
                try:
                    self.outcomes[name] = work(conn)
                except Exception as exc:
                    self.outcomes[name] = exc

        self.threads.append(threading.Thread(target=run))
        self.threads[-1].start()

    def waiting(self, name: str) -> bool:
        pid = self.pids.get(name)
        return pid is not None and bool(
            admin_query(self.dsn, "SELECT pg_blocking_pids(%s) <> '{}'", (pid,))[0][0]
        )

    def finish(self) -> dict[str, Any]:
        """Each operation's outcome, once all have ended; none may have raised."""
        for thread in self.threads:
            thread.join(timeout=30)
        for name, outcome in self.outcomes.items():
            assert not isinstance(outcome, BaseException), f"{name}: {outcome!r}"
        return self.outcomes


class Running:
    """A worker on its own loop in a thread, for tests that write while it listens."""

    def __init__(self, dsn: str, registry: Registry | None = None, **options: Any):
        self.worker = Worker(dsn, registry=registry or default_registry, **options)
        self.loop = LoopThread("test-worker")
        self.loop.run(self.worker.start(), timeout=10)

    def stop(self) -> None:
        self.loop.run(self.worker.stop(), timeout=15)
        self.loop.close()


def terminate_sessions(dsn: str) -> None:
    """End every other session of ``dsn``'s database, as a failover or a proxy would."""
    admin_query(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )


class DurableRunning:
    """The durable processors of ``channels`` on an engine of their own in a thread
    (``opts`` go to each processor, e.g. ``poll_interval``)."""

    def __init__(self, dsn: str, channels: list[Any], registry: Registry, **opts: Any):
        from pgpubsub.channel import spec_of
        from pgpubsub.durable import DurableRunner
        from pgpubsub.engine import Engine

        self.loop = LoopThread("test-durable")
        self.engine = Engine(dsn)
        specs = [spec_of(c) for c in channels]
        self.durable = DurableRunner(self.engine, specs, registry, **opts)

        async def start() -> None:
            await self.engine.start()
            await self.durable.start()

        self.loop.run(start(), timeout=10)

    def stop(self) -> None:
        async def stop() -> None:
            await self.durable.stop(10)
            await self.engine.stop()

        self.loop.run(stop(), timeout=20)
        self.loop.close()


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of ``spans`` (start, end) that overlap at one instant."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def record_calls(monkeypatch: Any, name: str) -> list[tuple[float, Any]]:
    """Each call of ``ChannelProcessor.<name>`` from now on: (time.monotonic() when it
    returned, what it returned)."""
    calls: list[tuple[float, Any]] = []
    real = getattr(ChannelProcessor, name)

    def recorded(self: ChannelProcessor, *args: Any) -> Any:
        result = real(self, *args)
        calls.append((time.monotonic(), result))
        return result

    monkeypatch.setattr(ChannelProcessor, name, recorded)
    return calls
