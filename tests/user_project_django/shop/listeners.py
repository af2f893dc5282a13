from decimal import Decimal

import pgpubsub

from .channels import OrderPaid, Refund
from .models import Ledger


@pgpubsub.listener(OrderPaid)
def record_payment(order_id: int, amount: Decimal) -> None:
    Ledger.objects.create(order_id=order_id, amount=amount)


@pgpubsub.listener(Refund)
def refund(order_id: int) -> None:
    Ledger.objects.create(order_id=order_id, amount=-1)
    raise RuntimeError(f"the bank refused the refund of order {order_id}")
