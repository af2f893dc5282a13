from dataclasses import dataclass

from pgpubsub.channel import Channel, TriggerChannel

from .models import Order


@dataclass
class OrderChanged(TriggerChannel):
    """Row events of shop_order, sent by a trigger; durable: each handled exactly once."""

    model = Order
    lock_notifications = True


@dataclass
class Greeting(Channel, name="greetings"):
    """A plain channel: every listening worker hears it, while it listens."""

    name: str
