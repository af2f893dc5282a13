"""The listening engine: dispatch, isolation, backpressure, supervision."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest
from helpers import admin_query

from pgpubsub import Backoff, Engine, Gap, Notify


async def publish(dsn: str, channel: str, payloads: list[str]) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for p in payloads:
            await conn.execute("SELECT pg_notify(%s, %s)", (channel, p))
        await conn.commit()


class Collector:
    def __init__(self, expect: int):
        self.items: list[Notify] = []
        self.expect = expect
        self.done = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    async def __call__(self, msg: Notify) -> None:
        self.items.append(msg)
        if len(self.items) >= self.expect:
            self.done.set()

    async def wait(self, timeout: float = 10) -> list[Notify]:
        await asyncio.wait_for(self.done.wait(), timeout)
        return self.items


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_channel_added_while_running_is_listened_at_once(dsn: str) -> None:
    async def main() -> None:
        engine = Engine(dsn)
        await engine.start()
        try:
            got = Collector(1)
            await engine.subscribe("Late", got)
            await publish(dsn, "Late", ["now"])
            assert [m.payload for m in await got.wait()] == ["now"]
            assert engine.status().healthy and engine.status().channels == {"Late"}
        finally:
            await engine.stop()

    run(main())


def test_raising_handler_does_not_stop_another(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        engine = Engine(dsn)
        good = Collector(50)

        async def bad(msg: Notify) -> None:
            raise RuntimeError(f"boom {msg.payload}")

        def bad_sync(msg: Notify) -> None:
            raise ValueError("sync boom")

        await engine.subscribe("ch", bad)
        await engine.subscribe("ch", bad_sync)
        await engine.subscribe("ch", good)
        await engine.start()
        try:
            await publish(dsn, "ch", [str(i) for i in range(50)])
            assert [m.payload for m in await good.wait()] == [str(i) for i in range(50)]
            await asyncio.sleep(0.2)
            assert engine.status().handler_errors == 100
        finally:
            await engine.stop()

    run(main())
    record = next(r for r in caplog.records if "boom" in r.getMessage())
    assert record.channel == "ch" and "bad" in record.handler  # type: ignore[attr-defined]


def test_slow_sync_handler_does_not_block_other_channels(dsn: str) -> None:
    async def main() -> None:
        engine = Engine(dsn)
        release = threading.Event()
        fast = Collector(20)
        await engine.subscribe("slow", lambda msg: release.wait(10))
        await engine.subscribe("fast", fast)
        await engine.start()
        try:
            await publish(dsn, "slow", ["x"] * 5)
            await publish(dsn, "fast", [str(i) for i in range(20)])
            assert len(await fast.wait(5)) == 20
        finally:
            release.set()
            await engine.stop()

    run(main())


def test_batch_handler_and_commit_order(dsn: str) -> None:
    async def main() -> None:
        engine = Engine(dsn)
        got: list[str] = []
        done = asyncio.Event()

        def batch(msgs: list[Notify]) -> None:
            got.extend(m.payload for m in msgs)
            if len(got) >= 2000:
                engine._loop.call_soon_threadsafe(done.set)  # type: ignore[union-attr]

        await engine.subscribe("b", batch, batch=True)
        await engine.start()
        try:
            await publish(dsn, "b", [str(i) for i in range(2000)])
            await asyncio.wait_for(done.wait(), 10)
            assert got == [str(i) for i in range(2000)]
        finally:
            await engine.stop()

    run(main())


def test_slow_handler_gets_backpressure_not_an_unbounded_queue(dsn: str) -> None:
    async def main() -> None:
        engine = Engine(dsn, max_pending=100)
        seen: list[int] = []
        peak = 0

        async def slow(msg: Notify) -> None:
            nonlocal peak
            peak = max(peak, engine.status().pending)
            seen.append(int(msg.payload))
            await asyncio.sleep(0)

        await engine.subscribe("bp", slow)
        await engine.start()
        try:
            await publish(dsn, "bp", [str(i) for i in range(3000)])
            deadline = time.monotonic() + 20
            while len(seen) < 3000 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert seen == list(range(3000))
            assert peak <= 100 + 1000  # one socket read's worth past the bound at most
        finally:
            await engine.stop()

    run(main())


def test_stop_is_bounded_and_leaves_no_thread(dsn: str) -> None:
    before = set(threading.enumerate())

    async def main() -> None:
        engine = Engine(dsn)
        await engine.subscribe("t", lambda m: time.sleep(30))
        await engine.start()
        await publish(dsn, "t", ["block"])
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await engine.stop(timeout=0.5)
        assert time.monotonic() - started < 3
        assert not engine.running and engine.status().state == "stopped"

    run(main())
    # The blocked sync handler's thread is a daemon: it cannot keep the process alive.
    assert all(t.daemon for t in set(threading.enumerate()) - before)


@pytest.mark.chaos
def test_killed_backend_every_2s_reconnects_and_reports_gaps(dsn: str) -> None:
    async def main() -> None:
        engine = Engine(dsn, backoff=Backoff(base=0.05, cap=1))
        gaps: list[Gap] = []
        engine.add_gap_handler(gaps.append)
        got = Collector(1)
        await engine.subscribe("live", got)
        await engine.start()
        try:
            for round_ in range(3):
                pid = engine.status().backend_pid
                admin_query(dsn, "SELECT pg_terminate_backend(%s)", (pid,))
                deadline = time.monotonic() + 2
                while not (engine.status().healthy and engine.status().backend_pid != pid):
                    assert time.monotonic() < deadline, "not listening again within 2 s"
                    await asyncio.sleep(0.02)
                assert len(gaps) == round_ + 1
                got.done.clear()
                got.expect = len(got.items) + 1
                await publish(dsn, "live", [f"after kill {round_}"])
                await got.wait(5)
            assert [m.payload for m in got.items] == [f"after kill {i}" for i in range(3)]
            assert engine.status().reconnects == 3
        finally:
            await engine.stop()

    run(main())


@pytest.mark.chaos
def test_server_restart_is_survived_with_backoff() -> None:
    from pgpubsub.embedded import EmbeddedServer

    async def main(server: EmbeddedServer) -> None:
        engine = Engine(server.conninfo, backoff=Backoff(base=0.2, factor=2, cap=1))
        gaps: list[Gap] = []
        engine.add_gap_handler(gaps.append)
        got = Collector(1)
        await engine.subscribe("r", got)
        await engine.start()
        try:
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(2.5)
            assert engine.status().state == "reconnecting"
            await asyncio.to_thread(server.start)
            deadline = time.monotonic() + 10
            while not engine.status().healthy:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert len(gaps) == 1
            # 2.5 s down with delays of at least 0.2 s: a handful of attempts, no tight loop.
            assert 2 <= gaps[0].attempts <= 15
            await publish(server.conninfo, "r", ["back"])
            assert [m.payload for m in await got.wait()] == ["back"]
        finally:
            await engine.stop()

    with EmbeddedServer(prepare=True) as server:
        run(main(server))


def test_start_waits_for_the_server_only_as_long_as_start_timeout() -> None:
    from pgpubsub import ConnectionFailed

    async def main() -> None:
        engine = Engine(
            "host=127.0.0.1 port=1 connect_timeout=2",
            start_timeout=1.5,
            backoff=Backoff(base=0.1, cap=0.3),
        )
        started = time.monotonic()
        with pytest.raises(ConnectionFailed, match="gave up after"):
            await engine.start()
        assert 1.0 < time.monotonic() - started < 5
        assert not engine.running

    run(main())


def test_refused_credentials_fail_at_once_instead_of_waiting(dsn: str) -> None:
    from psycopg.conninfo import make_conninfo

    from pgpubsub import ConnectionFailed

    async def main() -> None:
        engine = Engine(make_conninfo(dsn, dbname="no_such_database_here"))
        started = time.monotonic()
        with pytest.raises(ConnectionFailed, match="does not exist"):
            await engine.start()
        assert time.monotonic() - started < 3

    run(main())
