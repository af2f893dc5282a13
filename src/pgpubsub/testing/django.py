"""``pgpubsub.testing`` in Django's test cases.

::

    from pgpubsub.testing import drain, published
    from pgpubsub.testing.django import PubSubTestCase

    class OrderTests(PubSubTestCase):
        def test_an_order_ships(self):
            Order.objects.create(total=10)           # a trigger channel, or notify()
            self.assertEqual(len(published(OrderEvents)), 1)
            self.assertEqual(drain(), 1)             # in the test's transaction

Messages published inside the test's transaction are visible without a
commit: stored ones are read on Django's connection, plain ones published
with ``pgpubsub.notify`` are recorded in this process (PostgreSQL delivers a
NOTIFY only at commit, which a ``TestCase`` never does; so plain *trigger*
channels cannot be seen here: use a ``TransactionTestCase`` with the pytest
plugin's LISTEN, or make the channel durable).
"""

from __future__ import annotations

from django.test import TestCase

from ._capture import DjangoCapture

__all__ = ["PubSubMixin", "PubSubTestCase"]


class PubSubMixin:
    """Records what each test publishes, for :func:`~pgpubsub.testing.published`."""

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self._pgpubsub_capture = DjangoCapture()
        self._pgpubsub_capture.start()
        self.addCleanup(self._pgpubsub_capture.stop)  # type: ignore[attr-defined]


class PubSubTestCase(PubSubMixin, TestCase):  # type: ignore[misc]
    """A Django ``TestCase`` in which ``published()`` and ``drain()`` need no DSN."""
