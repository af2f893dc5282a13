"""The user's code under test: a durable listener that writes, one that fails, a plain channel."""

from __future__ import annotations

import os
from dataclasses import dataclass
from decimal import Decimal

import pgpubsub
from pgpubsub.channel import Channel, TriggerChannel
from pgpubsub.durable import connection


@dataclass
class OrderPaid(Channel, lock_notifications=True, max_attempts=3):
    order_id: int
    amount: Decimal


@dataclass
class Refund(Channel, lock_notifications=True, max_attempts=2):
    order_id: int


@dataclass
class PriceChanged(Channel):
    sku: str
    price: Decimal


@pgpubsub.listener(OrderPaid)
def record_payment(order_id: int, amount: Decimal) -> None:
    if os.environ.get("SHOP_BUG"):  # tests/test_testing.py: do these tests catch a bug?
        amount = amount * 2
    connection().execute(
        "INSERT INTO ledger (order_id, amount) VALUES (%s, %s)", (order_id, amount)
    )


@pgpubsub.listener(Refund)
def refund(order_id: int) -> None:
    connection().execute("INSERT INTO ledger (order_id, amount) VALUES (%s, -1)", (order_id,))
    raise RuntimeError(f"the bank refused the refund of order {order_id}")


@dataclass
class ProductEvents(TriggerChannel, table="public.products"):
    pass


@pgpubsub.post_insert_listener(ProductEvents)
def product_added(new: dict[str, object]) -> None:
    pass
