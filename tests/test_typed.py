"""Typed channels, listeners and notify, through a real NOTIFY."""

from __future__ import annotations

import asyncio
import datetime
import logging
import uuid
from collections import defaultdict
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from app.channels import Colour, Everything, LockedPostReads, Optionals, Point, PostReads, Reads
from helpers import Running, admin_query, wait_until

import pgpubsub
from pgpubsub import durable
from pgpubsub.channel import resolve_channel, spec_of
from pgpubsub.errors import ChannelNotFound, ConfigurationError, PayloadTooLarge, SchemaMismatch
from pgpubsub.listen import Registry
from pgpubsub.notify import notify_many
from pgpubsub.worker import Worker

IST = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
EVERYTHING = Everything(
    i=-7, s="it's \"quoted\" $$ \\", f=1.5, b=True, maybe=None,
    day=datetime.date(2024, 2, 29),
    naive=datetime.datetime(2024, 1, 2, 3, 4, 5, 123456),
    aware=datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=IST),
    uid=uuid.uuid4(), money=Decimal("12345678901234567890.000001"), colour=Colour.BLUE,
    raw=b"\x00\xffbytes", ints=[1, 2, 3], tags={"a", "b"}, pair=(1, "one"),
    mapping={"x": 0.25}, point=Point(1.0, -2.0), points=[Point(0, 0)],
    no_day=None, default_list=["d"],
)  # fmt: skip


def run_worker_until(
    dsn: str, registry: Registry, publish: Any, expect: int, received: list[Any]
) -> None:
    async def main() -> None:
        worker = Worker(dsn, registry=registry)
        await worker.start()
        try:
            await asyncio.to_thread(publish)
            for _ in range(500):
                if len(received) >= expect:
                    break
                await asyncio.sleep(0.01)
        finally:
            await worker.stop()

    asyncio.run(main())


def test_every_supported_type_round_trips(dsn: str) -> None:
    registry = Registry()
    received: list[Any] = []

    def everything(**fields: Any) -> None:
        received.append(Everything(**fields))

    registry.add(Everything, everything)

    def publish() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgpubsub.notify(Everything, conn=conn, **vars(EVERYTHING))

    run_worker_until(dsn, registry, publish, 1, received)
    assert received == [EVERYTHING]
    got = received[0]
    assert got.aware.utcoffset() == datetime.timedelta(hours=5, minutes=30)
    assert got.naive.tzinfo is None and isinstance(got.money, Decimal)
    assert isinstance(got.point, Point) and got.colour is Colour.BLUE


def test_seed_post_reads_cache(dsn: str) -> None:
    # The seed's listeners.py example, translated to plain Python.
    registry = Registry()
    post_reads_per_date_cache: dict[datetime.date, dict[int, int]] = defaultdict(dict)

    def update_post_reads_per_date_cache(model_id: int, date: datetime.date) -> None:
        current_count = post_reads_per_date_cache[date].get(model_id, 0)
        post_reads_per_date_cache[date][model_id] = current_count + 1

    registry.add(PostReads, update_post_reads_per_date_cache)
    today = datetime.date.today()

    def publish() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for post_id in (1, 1, 2):
                pgpubsub.notify("app.channels.PostReads", conn=conn, model_id=post_id, date=today)

    done: list[Any] = []
    registry.add(PostReads, lambda model_id, date: done.append(1))
    run_worker_until(dsn, registry, publish, 3, done)
    assert post_reads_per_date_cache == {today: {1: 2, 2: 1}}


def test_several_listeners_with_optional_field_subsets(dsn: str) -> None:
    registry = Registry()
    calls: list[tuple[str, Any]] = []

    def only_required(required: int) -> None:
        calls.append(("required", required))

    async def with_extra(required: int, extra: str | None) -> None:
        calls.append(("extra", (required, extra)))

    def everything(**kw: Any) -> None:
        calls.append(("all", kw))

    for fn in (only_required, with_extra, everything):
        registry.add(Optionals, fn)

    def publish() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgpubsub.notify(Optionals, conn=conn, required=1, extra="x")

    run_worker_until(dsn, registry, publish, 3, calls)
    assert sorted(calls, key=lambda c: c[0]) == [
        ("all", {"required": 1, "extra": "x", "flag": False}),
        ("extra", (1, "x")),
        ("required", 1),
    ]


def test_schema_mismatch_is_logged_and_later_messages_arrive(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry()
    got: list[int] = []
    registry.add(Optionals, lambda required: got.append(required))
    name = spec_of(Optionals).name

    def publish() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for bad in ('{"required": "not an int"}', "not json", '{"extra": "no required"}'):
                conn.execute("SELECT pg_notify(%s, %s)", (name, bad))
            pgpubsub.notify(Optionals, conn=conn, required=5)

    run_worker_until(dsn, registry, publish, 1, got)
    assert got == [5]
    mismatches = [r for r in caplog.records if "SchemaMismatch" in r.getMessage()]
    assert len(mismatches) == 3


def test_notify_follows_the_transaction(dsn: str) -> None:
    with pgpubsub.connect(dsn) as sub, psycopg.connect(dsn) as conn:
        sub.listen(spec_of(Optionals).name)
        pgpubsub.notify(Optionals, conn=conn, required=1)
        conn.rollback()
        pgpubsub.notify(Optionals, conn=conn, required=2)
        assert sub.get_event() is None
        conn.commit()
        events = []
        for e in sub.events(select_timeout=1, yield_timeouts=True):
            if e is None:
                break
            events.append(e.payload)
        assert events == ['{"required":2,"extra":null,"flag":false}']


def test_notify_many_and_errors(dsn: str) -> None:
    with pgpubsub.connect(dsn) as sub, psycopg.connect(dsn, autocommit=True) as conn:
        sub.listen(spec_of(Optionals).name)
        assert notify_many(Optionals, [{"required": i} for i in range(100)], conn=conn) == 100
        got = []
        for e in sub.events(select_timeout=2, yield_timeouts=True):
            if e is None:
                break
            got.append(spec_of(Optionals).decode(e.payload).required)
        assert got == list(range(100))
        with pytest.raises(SchemaMismatch):
            pgpubsub.notify(Optionals, conn=conn, nonsense=1)
        with pytest.raises(PayloadTooLarge):
            pgpubsub.notify(Optionals, conn=conn, required=1, extra="x" * 8000)
        with pytest.raises(ChannelNotFound):
            pgpubsub.notify("app.channels.NoSuchChannel", conn=conn, required=1)


def test_names_are_readable_stable_and_bounded() -> None:
    assert spec_of(PostReads).name == "app.channels.PostReads"
    assert spec_of(Everything).name == "Everything Typed"
    assert resolve_channel("app.channels.PostReads") is spec_of(PostReads)
    from dataclasses import dataclass

    @dataclass
    class AVeryLongChannelClassNameThatGoesOnAndOnAndOnForeverAndEver(pgpubsub.Channel):
        x: int

    long = spec_of(AVeryLongChannelClassNameThatGoesOnAndOnAndOnForeverAndEver).name
    assert len(long.encode()) <= 63 and long.endswith(long.split("~")[1])
    assert "ForeverAndEver" in long


def test_bad_listener_signatures_are_rejected() -> None:
    registry = Registry()
    with pytest.raises(ConfigurationError, match="does not have"):
        registry.add(Optionals, lambda required, nope: None)
    with pytest.raises(ConfigurationError, match="required field"):
        registry.add(Optionals, lambda extra: None)
    with pytest.raises(ConfigurationError, match="dataclass"):

        class NotADataclass(pgpubsub.Channel):
            x: int

        spec_of(NotADataclass)


def test_seed_example_channels_with_a_none_default_deliver_none(dsn: str) -> None:
    """django-pgpubsub's ``date: datetime.date = None``: notify without it, listeners get None."""
    registry = Registry()
    received: list[tuple[int, str, datetime.date | None]] = []

    def update_post_reads_per_date_cache(model_id: int, date: datetime.date) -> None:
        received.append((model_id, "", date))

    def with_type(model_id: int, model_type: str, date: datetime.date) -> None:
        received.append((model_id, model_type, date))

    registry.add(PostReads, update_post_reads_per_date_cache)
    registry.add(Reads, with_type)
    day = datetime.date(2024, 2, 29)

    def publish() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgpubsub.notify("app.channels.PostReads", conn=conn, model_id=5)
            pgpubsub.notify(PostReads, conn=conn, model_id=6, date=day)
            pgpubsub.notify(Reads, conn=conn, model_id=7, model_type="Author")
            pgpubsub.notify(PostReads, conn=conn, model_id=8, date=None)

    run_worker_until(dsn, registry, publish, 4, received)
    assert sorted(received, key=lambda r: r[0]) == [
        (5, "", None),
        (6, "", day),
        (7, "Author", None),
        (8, "", None),
    ]
    assert spec_of(PostReads).decode('{"model_id": 5}') == PostReads(model_id=5)


def test_undecodable_plain_message_is_logged_with_its_payload(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry()
    got: list[int] = []
    registry.add(PostReads, lambda model_id: got.append(model_id))
    name = spec_of(PostReads).name
    wide = '{"model_id": "not an int", "pad": "' + "x" * 5000 + '"}'

    def publish() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_notify(%s, %s)", (name, wide))
            pgpubsub.notify(PostReads, conn=conn, model_id=1)

    run_worker_until(dsn, registry, publish, 1, got)
    assert got == [1]
    (record,) = [r for r in caplog.records if "SchemaMismatch" in r.getMessage()]
    assert record.levelno == logging.ERROR
    text = record.getMessage()
    assert '{"model_id": "not an int"' in text and f"({len(wide)} characters)" in text
    assert len(text) < 1000  # truncated


def test_durable_seed_channel_with_none_default_and_undecodable_kept_dead(dsn: str) -> None:
    durable.migrate(dsn)
    admin_query(dsn, "CREATE TABLE reads (model_id int, day date)")
    registry = Registry()

    def record(model_id: int, date: datetime.date) -> None:  # effects in the claim transaction
        durable.connection().execute("INSERT INTO reads VALUES (%s, %s)", (model_id, date))

    registry.add(LockedPostReads, record)
    name = spec_of(LockedPostReads).name
    with psycopg.connect(dsn) as conn:
        pgpubsub.notify(LockedPostReads, conn=conn, model_id=1)
        conn.execute(
            "INSERT INTO pgpubsub.message (channel, payload) VALUES (%s, %s)",
            (name, '{"model_id": "x"}'),
        )
    dead = "SELECT payload, attempts, last_error FROM pgpubsub.message WHERE status = 'dead'"
    run = Running(dsn, registry)
    try:  # dead at the first attempt: a payload that does not decode never will
        wait_until(lambda: admin_query(dsn, dead), timeout=5)
    finally:
        run.stop()
    assert admin_query(dsn, "SELECT * FROM reads") == [(1, None)]
    ((payload, attempts, error),) = admin_query(dsn, dead)
    assert (payload, attempts) == ('{"model_id": "x"}', 1)
    assert "SchemaMismatch" in error and "model_id" in error
    assert admin_query(dsn, "SELECT count(*) FROM pgpubsub.message") == [(1,)]
