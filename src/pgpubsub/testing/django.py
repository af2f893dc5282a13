"""``pgpubsub.testing`` in Django's test cases.

::

    from pgpubsub.testing import drain, published
    from pgpubsub.testing.django import PubSubTestCase

    class OrderTests(PubSubTestCase):
        def test_an_order_ships(self):
            Order.objects.create(total=10)           # a trigger channel, or notify()
            self.assertEqual(len(published(OrderEvents)), 1)
            self.assertEqual(drain(), 1)             # in the test's transaction

``published()`` and ``drain()`` without a DSN work in any ``TestCase`` (each
test's savepoint scopes what it sees); the mixin also forgets everything at the
start of each test, which a ``TransactionTestCase`` needs. Messages published
inside the test's transaction are visible without a commit: stored ones are
read on Django's connection, plain ones published with ``pgpubsub.notify`` are
recorded in this process (the last 10,000) (PostgreSQL delivers a
NOTIFY only at commit, which a ``TestCase`` never does; so plain *trigger*
channels cannot be seen here: use a ``TransactionTestCase`` with the pytest
plugin's LISTEN, or make the channel durable).
"""

from __future__ import annotations

from django.test import TestCase

from ._capture import django_capture

__all__ = ["PubSubMixin", "PubSubTestCase"]


class PubSubMixin:
    """Forget what earlier tests published, at the start of each test.

    A ``TestCase`` needs no mixin (each test has its own savepoint, which scopes
    what it sees); a ``TransactionTestCase`` commits, so it needs this.
    """

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        django_capture.reset()


class PubSubTestCase(PubSubMixin, TestCase):  # type: ignore[misc]
    """A Django ``TestCase`` that starts each test with nothing published."""
