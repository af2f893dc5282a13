"""The dashboard tests' application: a durable channel that can fail, a plain one to tail."""

from __future__ import annotations

from dataclasses import dataclass

import pgpubsub
from pgpubsub.channel import Channel
from pgpubsub.durable import connection


@dataclass
class Orders(Channel, name="orders", lock_notifications=True, max_attempts=1):
    order_id: int
    note: str = ""


@pgpubsub.listener(Orders)
def ship(order_id: int, note: str) -> None:
    # The test takes the payment service down with a row in payment_down.
    if connection().execute("SELECT count(*) FROM payment_down").fetchone() != (0,):
        raise ConnectionError(f"payment service is down: order {order_id} not charged")
    connection().execute("INSERT INTO shipped (order_id, note) VALUES (%s, %s)", (order_id, note))


@dataclass
class Chat(Channel, name="chat"):
    text: str


@pgpubsub.listener(Chat)
def read(text: str) -> None:
    pass
