import logging

import pgpubsub

from .channels import Greeting, OrderChanged
from .models import Order, Receipt

log = logging.getLogger(__name__)


@pgpubsub.post_insert_listener(OrderChanged)
def write_receipt(old: Order, new: Order) -> None:
    # Runs in the claim transaction: the receipt commits with the message's completion.
    Receipt.objects.create(order_id=new.pk, text=f"{new.customer} paid {new.total:.2f}")


@pgpubsub.listener(Greeting)
def greet(name: str) -> None:
    log.warning("hello, %s", name)
