"""Which durable channels have a message due now: the end of "process everything due now".

A claim that returns fewer messages than it asked for does not mean that none
is left: it returns one head per ordering key, and the next message of a key
becomes claimable only once its head completes. So the loops of
:func:`pgpubsub.durable.process_stored_notifications` and
:func:`pgpubsub.testing.drain` end when this query finds nothing due, with the
claim's own definition of "claimable": pending, ``run_at`` passed, and no
older pending message of its ordering key.
"""

from __future__ import annotations

from .session import Session

__all__ = ["DUE_SQL", "due_channels"]

DUE_SQL = """
SELECT c.name FROM pg_catalog.unnest(%s::text[]) AS c(name)
WHERE EXISTS (
    SELECT FROM pgpubsub.message m
    WHERE m.channel = c.name AND m.status = 'pending' AND m.run_at <= pg_catalog.now()
      AND (m.ordering_key IS NULL OR NOT EXISTS (
          SELECT FROM pgpubsub.message o
          WHERE o.channel = m.channel AND o.ordering_key = m.ordering_key
            AND o.status = 'pending' AND o.id < m.id))
)
"""


def due_channels(session: Session, names: list[str]) -> set[str]:
    """The channels among ``names`` with a claimable message due now (its own transaction)."""
    if not names:
        return set()
    with session.atomic():
        return {str(r[0]) for r in session.execute(DUE_SQL, (names,))}
