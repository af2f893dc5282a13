"""How a Django user tests listeners: inside TestCase, nothing is ever committed."""

from decimal import Decimal

from django.db import connection
from django.test import TestCase

import pgpubsub
from pgpubsub.models import Notification
from pgpubsub.testing import drain, published
from pgpubsub.testing.django import PubSubTestCase

from .channels import OrderPaid, PriceChanged, Refund
from .models import Ledger


class ListenerTests(PubSubTestCase):
    def test_a_paid_order_is_recorded_in_the_tests_transaction(self) -> None:
        pgpubsub.notify(OrderPaid, order_id=1, amount=Decimal("9.99"))
        self.assertTrue(connection.in_atomic_block)  # nothing was committed
        self.assertEqual(published(OrderPaid), [OrderPaid(order_id=1, amount=Decimal("9.99"))])
        self.assertEqual(drain(), 1)
        self.assertEqual(list(Ledger.objects.values_list("order_id", "amount")),
                         [(1, Decimal("9.99"))])
        self.assertEqual(drain(), 0)
        self.assertFalse(Notification.objects.exists())
        self.assertEqual(len(published(OrderPaid)), 1)  # still seen once processed

    def test_a_failing_listener_ends_dead_and_its_writes_are_undone(self) -> None:
        pgpubsub.notify(Refund, order_id=2)
        self.assertEqual(drain(), 0)
        dead = Notification.objects.get()
        self.assertEqual((dead.status, dead.attempts), ("dead", 2))
        self.assertIn("RuntimeError: the bank refused the refund of order 2", dead.last_error)
        self.assertFalse(Ledger.objects.exists())

    def test_plain_messages_inside_the_transaction(self) -> None:
        pgpubsub.notify(PriceChanged, sku="tea", price=Decimal("3.50"))
        self.assertEqual(published(PriceChanged), [PriceChanged(sku="tea", price=Decimal("3.50"))])

    def test_each_test_starts_empty(self) -> None:
        self.assertEqual(published(OrderPaid), [])
        self.assertEqual(published(PriceChanged), [])


class PlainTestCaseTests(TestCase):
    """Django's own TestCase, no mixin: each test's savepoint scopes what it sees."""

    def test_first(self) -> None:
        pgpubsub.notify(PriceChanged, sku="tea", price=Decimal(1))
        pgpubsub.notify(OrderPaid, order_id=5, amount=Decimal(5))
        self.assertEqual(published(PriceChanged), [PriceChanged(sku="tea", price=Decimal(1))])
        self.assertEqual(drain(), 1)
        self.assertEqual(published(OrderPaid), [OrderPaid(order_id=5, amount=Decimal(5))])

    def test_second_sees_nothing_of_the_first(self) -> None:
        self.assertEqual(published(PriceChanged), [])
        self.assertEqual(published(OrderPaid), [])

    def test_process_stored_notifications_inside_the_test(self) -> None:
        # django-pgpubsub's own call, in a test: it must not close the test's connection.
        pgpubsub.notify(OrderPaid, order_id=6, amount=Decimal(6))
        self.assertEqual(pgpubsub.process_stored_notifications(), 1)
        self.assertEqual(list(Ledger.objects.values_list("order_id", flat=True)), [6])
