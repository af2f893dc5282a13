"""How a user tests listeners with pgpubsub.testing: publish, look, drain, check."""

from __future__ import annotations

from decimal import Decimal

import psycopg
import pytest
from shop import OrderPaid, PriceChanged, ProductEvents, Refund

import pgpubsub
from pgpubsub.testing import drain, published
from pgpubsub.triggers import install_triggers


@pytest.fixture
def db(pgpubsub_dsn: str) -> str:
    with psycopg.connect(pgpubsub_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE ledger (order_id int, amount numeric)")
    return pgpubsub_dsn


def query(dsn: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


def test_a_paid_order_is_recorded_exactly_once(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify(OrderPaid, conn=conn, order_id=1, amount=Decimal("9.99"))
    assert published(OrderPaid, db) == [OrderPaid(order_id=1, amount=Decimal("9.99"))]
    assert drain(db) == 1
    assert query(db, "SELECT order_id, amount FROM ledger") == [(1, Decimal("9.99"))]
    assert drain(db) == 0  # nothing is due any more
    assert query(db, "SELECT count(*) FROM pgpubsub.message") == [(0,)]
    assert len(published(OrderPaid, db)) == 1  # still seen once processed


def test_a_failing_listener_is_retried_then_dead_and_its_writes_undone(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify(Refund, conn=conn, order_id=2)
    assert drain(db) == 0
    ((status, attempts, error),) = query(
        db, "SELECT status, attempts, last_error FROM pgpubsub.message"
    )
    assert (status, attempts) == ("dead", 2)
    assert "RuntimeError: the bank refused the refund of order 2" in error
    assert query(db, "SELECT * FROM ledger") == []  # rolled back with each attempt


def test_without_retry_a_failure_waits_for_its_delay(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify(Refund, conn=conn, order_id=3)
    assert drain(db, retry=False) == 0
    assert query(db, "SELECT status, attempts FROM pgpubsub.message") == [("pending", 1)]


def test_plain_messages_published_during_the_test(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify(PriceChanged, conn=conn, sku="tea", price=Decimal("3.50"))
        pgpubsub.notify_many(PriceChanged, [{"sku": "jam", "price": Decimal(2)}], conn=conn)
    assert published(PriceChanged, db) == [
        PriceChanged(sku="tea", price=Decimal("3.50")),
        PriceChanged(sku="jam", price=Decimal(2)),
    ]


def test_a_rolled_back_publish_was_never_published(db: str) -> None:
    with psycopg.connect(db) as conn:
        pgpubsub.notify(OrderPaid, conn=conn, order_id=4, amount=Decimal(1))
        pgpubsub.notify(PriceChanged, conn=conn, sku="tea", price=Decimal(1))
        conn.rollback()
    assert published(OrderPaid, db) == []
    assert published(PriceChanged, db) == []


def test_a_delayed_message_is_not_due(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify(OrderPaid(order_id=5, amount=Decimal(5)), conn=conn, delay=3600)
    assert drain(db) == 0
    assert query(db, "SELECT status FROM pgpubsub.message") == [("pending",)]


@pytest.mark.parametrize("run", [1, 2])
def test_every_test_starts_empty(db: str, run: int) -> None:
    assert published(OrderPaid, db) == []
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify(OrderPaid, conn=conn, order_id=run, amount=Decimal(run))
    assert len(published(OrderPaid, db)) == 1


def test_row_events_of_a_plain_trigger_channel_even_a_wide_row(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("CREATE TABLE products (sku text PRIMARY KEY, description text)")
        install_triggers(conn, [ProductEvents])
    with psycopg.connect(db) as conn:
        conn.execute("INSERT INTO products VALUES ('tea', 'green'), ('jam', %s)", ("x" * 10_000,))
    events = published(ProductEvents, db)
    assert [e.new["sku"] for e in events] == ["tea", "jam"]
    assert len(events[1].new["description"]) == 10_000  # sent as a reference, read back
    assert {e.operation for e in events} == {"INSERT"}
