"""Leases: what a worker holds beyond the life of one database session.

An ordering key in a listener, a ``max_in_flight`` slot and a
``key_concurrency`` slot of a limit_key are leased in ``pgpubsub.lease``, in
the name of their holder, ``<owner>#<processor>``. A lease is live while its
``expires_at`` is to come. The owner (a worker, or a
``process_stored_notifications`` call) runs a :class:`LeaseKeeper`: a thread
with a connection of its own that pushes the expiry of every lease it holds
:data:`TTL` seconds ahead, every third of that. So a killed backend, an idle
timeout, a failover or a proxy that drops the processing session frees nothing
while the listener that took the lease may still be running: the processor
gives its leases back when its listener returns (in the transaction that
records the message's outcome, or after a failed one, at its next round). A
process that died holds nothing :data:`TTL` seconds later. The one assumption
the guarantees make: a live owner reaches the database within :data:`TTL`
seconds (its keeper reconnects at once).

Advisory locks would be freed by the server when the session dies, with the
listener still running: that is why these are rows.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from . import driver
from .backoff import worth_logging

__all__ = ["TTL", "LeaseKeeper", "new_owner"]

log = logging.getLogger("pgpubsub.durable")

#: Seconds a lease lives unless its owner's keeper renews it.
TTL = 10.0

# A lease of row ``l`` is live. The statements that take one bind %(ttl)s.
LIVE = "l.expires_at > pg_catalog.clock_timestamp()"
EXPIRES = "pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => %(ttl)s)"

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
# key_concurrency: a slot of a limit_key is a lease of kind 'limit' named
# '<slot>' || E'\x1f' || key (slots 0 to key_concurrency - 1). The claim takes
# one free slot for each limit_key of its batch (its listeners run one after
# the other: one slot per key is enough), a random one, so that two claims
# rarely pick the same; of two that do, one gets it and the other gives that
# key's messages back. Keys in name order, as the bucket rows: no deadlock.
TAKE_LIMIT_SLOTS_SQL = f"""
INSERT INTO pgpubsub.lease AS l (channel, kind, name, holder, expires_at)
SELECT DISTINCT ON (k.key) %(channel)s, 'limit', s::text || E'\\x1f' || k.key, %(holder)s,
    {EXPIRES}
FROM pg_catalog.unnest(%(keys)s::text[]) k(key)
CROSS JOIN pg_catalog.generate_series(0, %(key_slots)s - 1) s
WHERE NOT EXISTS (
    SELECT 1 FROM pgpubsub.lease l WHERE l.channel = %(channel)s AND l.kind = 'limit'
    AND l.name = s::text || E'\\x1f' || k.key AND {LIVE}
)
ORDER BY k.key, pg_catalog.random()
ON CONFLICT (channel, kind, name) DO UPDATE SET holder = EXCLUDED.holder,
    expires_at = EXCLUDED.expires_at
WHERE NOT {LIVE}
RETURNING pg_catalog.substr(l.name, pg_catalog.strpos(l.name, E'\\x1f') + 1)
"""  # noqa: S608 - constant fragments


# Every lease this processor holds on the channel (after its batch, or a failed one).
RELEASE_SQL = "DELETE FROM pgpubsub.lease WHERE channel = %s AND holder = %s"
RENEW_SQL = (
    "UPDATE pgpubsub.lease SET expires_at = pg_catalog.clock_timestamp() "
    "+ pg_catalog.make_interval(secs => %s) WHERE pg_catalog.split_part(holder, '#', 1) = %s"
)


def new_owner() -> str:
    """A name for the leases of one process's processors: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaseKeeper:
    """Renews every lease of ``owner`` every ``TTL / 3`` seconds, in a daemon thread."""

    def __init__(self, conninfo: str, owner: str):
        self.conninfo = conninfo
        self.owner = owner
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"pgpubsub-leases:{owner}", daemon=True
        )

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                with driver.connect(self.conninfo, autocommit=True) as conn:
                    failures = 0
                    while not self._stopping.is_set():
                        conn.execute(RENEW_SQL, (TTL, self.owner))
                        self._stopping.wait(TTL / 3)
            except Exception as exc:  # reconnect at once: the leases have TTL seconds
                failures += 1
                level = logging.WARNING if worth_logging(failures) else logging.DEBUG
                log.log(level, "leases of %s not renewed: %s", self.owner, driver.one_line(exc))
                self._stopping.wait(min(1.0, TTL / 10))
