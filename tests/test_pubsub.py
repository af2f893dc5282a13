"""The connection level (seed 003 API), sync and async, against a real server."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from helpers import admin_query

import pgpubsub
from pgpubsub import Notify, errors


def next_event(pubsub: pgpubsub.PubSub, timeout: float = 5) -> pgpubsub.Notify:
    for event in pubsub.events(select_timeout=timeout, yield_timeouts=True):
        assert event is not None, "no event within the timeout"
        return event
    raise AssertionError("unreachable")


def test_notify_reaches_listener_with_pid(dsn: str) -> None:
    with pgpubsub.connect(dsn) as sub, pgpubsub.connect(dsn) as pub:
        sub.listen("chan")
        pub.notify("chan", "hello")
        event = next_event(sub)
        assert (event.channel, event.payload) == ("chan", "hello")
        assert event.pid == pub.conn.info.backend_pid


def test_rollback_gives_nothing_and_commit_exactly_one(dsn: str) -> None:
    with pgpubsub.connect(dsn) as sub, pgpubsub.connect(dsn) as pub:
        sub.listen("tx")
        with pytest.raises(ZeroDivisionError), pub.conn.transaction():
            pub.notify("tx", "rolled back")
            1 / 0  # noqa: B018
        with pub.conn.transaction():
            pub.notify("tx", "committed")
            time.sleep(0.2)
            assert sub.get_event() is None, "delivered before commit"
        event = next_event(sub)
        assert event.payload == "committed"
        time.sleep(0.2)
        assert sub.get_event() is None


@pytest.mark.parametrize("name", ["x; DROP TABLE users", 'a"b', "é" * 31, "with space"])
def test_odd_names_are_quoted_not_executed(dsn: str, name: str) -> None:
    admin_query(dsn, "CREATE TABLE users (id int)")
    with pgpubsub.connect(dsn) as sub:
        sub.listen(name)
        sub.notify(name, "ok")
        assert next_event(sub) == Notify(sub.conn.info.backend_pid, name, "ok")
    assert admin_query(dsn, "SELECT to_regclass('users') IS NOT NULL") == [(True,)]


def test_mixed_case_names_are_distinct_channels(dsn: str) -> None:
    with pgpubsub.connect(dsn) as upper, pgpubsub.connect(dsn) as lower:
        upper.listen("Foo")
        lower.listen("foo")
        upper.notify("Foo", "to Foo")
        lower.notify("foo", "to foo")
        assert next_event(upper).payload == "to Foo"
        assert next_event(lower).payload == "to foo"
        time.sleep(0.2)
        assert upper.get_event() is None and lower.get_event() is None


@pytest.mark.parametrize("name", ["a" * 64, "", "a\x00b"])
def test_bad_names_fail_before_sql(dsn: str, name: str) -> None:
    with pgpubsub.connect(dsn) as sub:
        with pytest.raises(errors.InvalidChannelName):
            sub.listen(name)
        with pytest.raises(errors.InvalidChannelName):
            sub.notify(name, "x")
        assert sub.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_payload_limits_in_bytes(dsn: str) -> None:
    with pgpubsub.connect(dsn) as sub:
        sub.listen("big")
        sub.notify("big", "a" * 7999)
        assert next_event(sub).payload == "a" * 7999
        with pytest.raises(errors.PayloadTooLarge):
            sub.notify("big", "a" * 8000)
        with pytest.raises(errors.PayloadTooLarge):
            sub.notify("big", "é" * 4000)
        with pytest.raises(errors.PayloadError):
            sub.notify("big", "nul\x00here")
        sub.notify("big", "still works")
        assert next_event(sub).payload == "still works"


HOSTILE = [
    "it's",
    "$$ body $$",
    "back\\slash \\x00 \\n",
    '{"a": "\'"}',
    "é✓𝄞",
    "'); DROP TABLE x; --",
]


@pytest.mark.parametrize("payload", HOSTILE)
def test_hostile_payloads_round_trip_byte_exact(dsn: str, payload: str) -> None:
    with pgpubsub.connect(dsn) as sub:
        sub.listen("p")
        sub.notify("p", payload)
        assert next_event(sub).payload == payload


def test_own_notify_is_returned_without_waiting(dsn: str) -> None:
    with pgpubsub.connect(dsn) as sub:
        sub.listen("self")
        sub.notify("self", "one")
        sub.notify("self", "two")
        assert [sub.get_event(), sub.get_event(), sub.get_event()] == [
            Notify(sub.conn.info.backend_pid, "self", "one"),
            Notify(sub.conn.info.backend_pid, "self", "two"),
            None,
        ]


def test_unlisten_stops_delivery(dsn: str) -> None:
    with pgpubsub.connect(dsn) as sub, pgpubsub.connect(dsn) as pub:
        sub.listen("a")
        sub.listen("b")
        sub.unlisten("a")
        pub.notify("a", "gone")
        pub.notify("b", "kept")
        assert next_event(sub).payload == "kept"
        assert sub.channels == {"b"}


def test_yield_timeouts_yields_none(dsn: str) -> None:
    with pgpubsub.connect(dsn) as sub:
        sub.listen("quiet")
        started = time.monotonic()
        assert next(sub.events(select_timeout=0.1, yield_timeouts=True)) is None
        assert time.monotonic() - started < 2


def test_killed_backend_raises_connection_lost(dsn: str) -> None:
    with pgpubsub.connect(dsn) as sub:
        sub.listen("k")
        admin_query(dsn, "SELECT pg_terminate_backend(%s)", (sub.conn.info.backend_pid,))
        started = time.monotonic()
        with pytest.raises(errors.ConnectionLost) as info:
            for _ in sub.events(select_timeout=0.2):
                pass
        assert time.monotonic() - started < 5
        assert isinstance(info.value.__cause__, psycopg.OperationalError) or "closed" in str(
            info.value
        )
        with pytest.raises(errors.ConnectionLost):
            sub.notify("k", "x")


def test_a_connection_that_never_opened_is_connection_failed_not_lost() -> None:
    with pytest.raises(errors.ConnectionFailed) as caught:
        pgpubsub.connect("host=127.0.0.1 port=1 connect_timeout=2")
    assert isinstance(caught.value, errors.DatabaseConnectionError)
    assert not isinstance(caught.value, errors.ConnectionLost)
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)


def test_application_name_is_set(dsn: str) -> None:
    with pgpubsub.connect(dsn) as sub:
        assert sub.conn.info.parameter_status("application_name") == "pgpubsub"


# -- asyncio ---------------------------------------------------------------


async def anext_event(sub: pgpubsub.AsyncPubSub, timeout: float = 5) -> pgpubsub.Notify:
    async for event in sub.events(select_timeout=timeout, yield_timeouts=True):
        assert event is not None, "no event within the timeout"
        return event
    raise AssertionError("unreachable")


def test_async_pubsub_delivers_in_commit_order(dsn: str) -> None:
    async def main() -> None:
        async with await pgpubsub.connect_async(dsn) as sub:
            async with await pgpubsub.connect_async(dsn) as pub:
                await sub.listen("Order")
                for i in range(100):
                    await pub.notify("Order", str(i))
                got = [(await anext_event(sub)).payload for _ in range(100)]
                assert got == [str(i) for i in range(100)]
                async with pub.conn.transaction():
                    await pub.notify("Order", "late")
                    await asyncio.sleep(0.2)
                    assert sub.get_event() is None
                assert (await anext_event(sub)).payload == "late"

    asyncio.run(main())


def test_async_pubsub_notify_while_another_task_waits(dsn: str) -> None:
    async def main() -> None:
        async with await pgpubsub.connect_async(dsn) as sub:
            await sub.listen("echo")
            waiter = asyncio.create_task(anext_event(sub))
            await asyncio.sleep(0.05)
            await sub.notify("echo", "from myself")
            event = await asyncio.wait_for(waiter, 5)
            assert event.payload == "from myself"

    asyncio.run(main())


def test_async_killed_backend_raises_connection_lost(dsn: str) -> None:
    async def main() -> None:
        async with await pgpubsub.connect_async(dsn) as sub:
            await sub.listen("k")
            admin_query(dsn, "SELECT pg_terminate_backend(%s)", (sub.conn.info.backend_pid,))
            with pytest.raises(errors.ConnectionLost):
                async for _ in sub.events(select_timeout=0.2):
                    pass

    asyncio.run(main())


@pytest.mark.unit
def test_sync_and_async_twins_keep_in_step() -> None:
    """PubSub and AsyncPubSub, notify and anotify: same names, same parameters."""
    import inspect

    from pgpubsub import AsyncPubSub, PubSub, anotify, notify

    def api(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(fn).parameters)
            for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")
        }

    assert api(PubSub) == api(AsyncPubSub)
    own = [name for name in vars(AsyncPubSub) if name in api(AsyncPubSub)]
    assert own  # the I/O methods each class defines: async in one, plain in the other

    def is_async(fn: object) -> bool:
        return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)

    assert all(is_async(vars(AsyncPubSub)[n]) and not is_async(vars(PubSub)[n]) for n in own)
    assert list(inspect.signature(notify).parameters) == list(inspect.signature(anotify).parameters)
