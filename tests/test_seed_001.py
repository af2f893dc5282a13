"""psqlpy's Listener documents (seed 001), with only the import line changed."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from helpers import admin_query

from pgpubsub import Connection, ConnectionPool, Listener, ListenerNotificationMsg
from pgpubsub.errors import ListenerStartError


async def send(dsn: str, channel: str, payload: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def test_background_task_usage(dsn: str) -> None:
    received: list[tuple[str, str, int]] = []
    arrived = asyncio.Event

    async def main() -> None:
        got = arrived()
        db_pool = ConnectionPool(dsn=dsn)

        async def test_channel_callback(
            connection: Connection,
            payload: str,
            channel: str,
            process_id: int,
        ) -> None:
            # do some important staff
            row = await (await connection.execute("SELECT %s::text", (payload,))).fetchone()
            received.append((row[0], channel, process_id))
            got.set()

        # Create listener object
        listener: Listener = db_pool.listener()
        # Add channel to listen and callback for it.
        await listener.add_callback(
            channel="test_channel",
            callback=test_channel_callback,
        )
        # Startup the listener
        await listener.startup()
        # Start listening.
        listener.listen()
        assert listener.is_started
        await send(dsn, "test_channel", "hello")
        await asyncio.wait_for(got.wait(), 5)
        # You can stop listening.
        listener.abort_listen()
        await listener.shutdown()
        assert not listener.is_started

    asyncio.run(main())
    assert received[0][:2] == ("hello", "test_channel") and received[0][2] > 0


def test_async_iterator_usage(dsn: str) -> None:
    async def main() -> None:
        db_pool = ConnectionPool(dsn=dsn)
        listener: Listener = db_pool.listener()
        await listener.add_callback(channel="Mixed Case", callback=lambda *a: None)
        await listener.startup()
        await send(dsn, "Mixed Case", "one")
        listener_msg: ListenerNotificationMsg
        async for listener_msg in listener:
            print(listener_msg)
            assert (listener_msg.channel, listener_msg.payload) == ("Mixed Case", "one")
            assert listener_msg.connection is listener.connection
            break
        await listener.shutdown()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_callbacks_can_be_added_after_listen_and_cleared(dsn: str) -> None:
    async def main() -> None:
        listener = Listener(dsn)
        await listener.startup()
        listener.listen()
        seen: list[str] = []
        got = asyncio.Event()

        async def cb(connection: Connection, *args: object) -> None:
            seen.append(str(args[0]))
            got.set()

        await listener.add_callback(channel="late", callback=cb)
        await send(dsn, "late", "a")
        await asyncio.wait_for(got.wait(), 5)
        await listener.clear_channel_callbacks("late")
        assert listener.status().channels == frozenset()
        await listener.add_callback(channel="x", callback=cb)
        await listener.clear_all_channels()
        assert listener.status().channels == frozenset()
        await listener.shutdown()
        assert seen == ["a"]

    asyncio.run(main())


def test_raising_and_slow_callbacks_do_not_block_others(dsn: str) -> None:
    async def main() -> None:
        listener = Listener(dsn)
        fine: list[str] = []
        done = asyncio.Event()

        async def raises(*args: object) -> None:
            raise RuntimeError("callback bug")

        async def slow(*args: object) -> None:
            await asyncio.sleep(60)

        async def ok(connection: Connection, payload: str, channel: str, pid: int) -> None:
            fine.append(payload)
            if len(fine) == 10:
                done.set()

        for cb in (raises, slow, ok):
            await listener.add_callback(channel="c", callback=cb)
        await listener.startup()
        listener.listen()
        for i in range(10):
            await send(dsn, "c", str(i))
        await asyncio.wait_for(done.wait(), 5)
        assert fine == [str(i) for i in range(10)]
        await listener.shutdown()

    asyncio.run(main())


def test_connection_attribute_before_startup_raises() -> None:
    listener = Listener("dbname=nothing")
    with pytest.raises(ListenerStartError):
        listener.connection  # noqa: B018
    assert not listener.is_started
    with pytest.raises(ListenerStartError):
        listener.listen()


@pytest.mark.chaos
def test_dropped_connection_is_reconnected_and_is_started_tells_truth(dsn: str) -> None:
    async def main() -> None:
        listener = Listener(dsn)
        got = asyncio.Event()
        gaps: list[object] = []
        listener.add_gap_callback(gaps.append)

        async def cb(*args: object) -> None:
            got.set()

        await listener.add_callback(channel="r", callback=cb)
        await listener.startup()
        listener.listen()
        admin_query(dsn, "SELECT pg_terminate_backend(%s)", (listener.status().backend_pid,))
        for _ in range(200):
            if gaps:
                break
            await asyncio.sleep(0.02)
        assert gaps and listener.is_started and listener.status().healthy
        await send(dsn, "r", "after")
        await asyncio.wait_for(got.wait(), 5)
        await listener.shutdown()
        assert not listener.is_started

    asyncio.run(main())
