"""Test your own listeners: a pytest plugin, and helpers that also work in Django's TestCase.

In ``conftest.py``::

    pytest_plugins = ["pgpubsub.testing"]

then::

    def test_an_order_ships(pgpubsub_dsn):
        with psycopg.connect(pgpubsub_dsn, autocommit=True) as conn:
            pgpubsub.notify(Orders, conn=conn, order_id=7)
        assert published(Orders, pgpubsub_dsn) == [Orders(order_id=7)]
        assert drain(pgpubsub_dsn) == 1          # your listener ran, as in a worker

* :func:`~pgpubsub.testing.fixtures.pgpubsub_dsn` (fixture): a throwaway
  database with the schema installed, new for each test (on the embedded
  server, or the server ``PGPUBSUB_TEST_DSN`` names).
* :func:`published`: the decoded messages published on a channel since the
  test started: durable ones as stored, plain ones as a LISTEN opened at the
  start of the test received them.
* :func:`drain`: runs the registered listeners on every due stored message in
  this process, the way a worker does: a failure is retried (at once, not
  after its delay) until the message completes or is dead with its traceback.

Under Django, call both without a DSN (``published(Orders)``, ``drain()``):
they use Django's connection, so inside a ``TestCase`` they see what the test
published in its transaction, which is never committed
(:mod:`pgpubsub.testing.django`).
"""

from ._helpers import DrainIncomplete, drain, published

__all__ = ["DrainIncomplete", "drain", "published"]

# As a pytest plugin, this module brings the fixtures; imported elsewhere (a
# Django test runner), it needs no pytest.
pytest_plugins = ["pgpubsub.testing.fixtures"]
