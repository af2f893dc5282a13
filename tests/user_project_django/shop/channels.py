from dataclasses import dataclass
from decimal import Decimal

from pgpubsub.channel import Channel


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
