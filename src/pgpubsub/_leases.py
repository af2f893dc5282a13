"""Leases: what a worker holds beyond the life of one database session.

An ordering key in a listener and a ``max_in_flight`` slot are leased in
``pgpubsub.lease``, in the name of their holder: ``<worker id>#<processor>``,
the worker id being its row in the worker registry. A lease is live while its
``expires_at`` is to come (:data:`TTL` after it was taken) or while its
holder's worker is: its registry row was refreshed within :data:`GRACE`
seconds (the heartbeat refreshes it every 5 s from a connection of its own).
So a killed backend, an idle timeout, a failover or a proxy that drops the
processing session frees nothing while the listener that took the lease may
still be running: the processor gives its leases back when its listener
returns (in the transaction that records the message's outcome, or after a
failed one, at its next round). A worker that died (or cannot reach the
database for longer than :data:`GRACE`) holds nothing :data:`TTL` seconds
after it took its leases at the latest: that is the one time bound the
guarantees assume.

Advisory locks would be freed by the server when the session dies, with the
listener still running: that is why these are rows.
"""

from __future__ import annotations

import os
import socket
import uuid

__all__ = ["GRACE", "TTL", "drain_holder"]

#: Seconds a lease lives without its holder's worker refreshing its registry row.
TTL = 10.0
#: Seconds since its worker's last heartbeat within which a holder is alive.
GRACE = 12.0

# A lease of row ``l`` is live (the SQL below names it ``l``).
LIVE = (
    "(l.expires_at > pg_catalog.clock_timestamp() OR EXISTS ("  # noqa: S608 - constants
    "SELECT 1 FROM pgpubsub.worker w WHERE w.id = pg_catalog.split_part(l.holder, '#', 1) "
    f"AND w.last_seen > pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => {GRACE})))"
)
EXPIRES = f"pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => {TTL})"

# One free slot of the channel's max_in_flight, taken (its number), or none.
# Two workers may pick the same free slot: one gets it, the other nothing this
# time (it sleeps until a slot is given back, which wakes the channel).
TAKE_SLOT_SQL = f"""
INSERT INTO pgpubsub.lease AS l (channel, kind, name, holder, expires_at)
SELECT %(channel)s, 'slot', s::text, %(holder)s, {EXPIRES}
FROM pg_catalog.generate_series(0, %(slots)s - 1) s
WHERE NOT EXISTS (
    SELECT 1 FROM pgpubsub.lease l
    WHERE l.channel = %(channel)s AND l.kind = 'slot' AND l.name = s::text AND {LIVE}
)
ORDER BY pg_catalog.random() LIMIT 1
ON CONFLICT (channel, kind, name) DO UPDATE SET holder = EXCLUDED.holder,
    expires_at = EXCLUDED.expires_at
WHERE NOT {LIVE}
RETURNING l.name
"""  # noqa: S608 - constant fragments
# Every lease this processor holds on the channel (after its batch, or a failed one).
RELEASE_SQL = "DELETE FROM pgpubsub.lease WHERE channel = %s AND holder = %s"


def drain_holder() -> str:
    """A holder for processing outside a worker (``process_stored_notifications``)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}#drain"
