"""What "due" means: waiting for a worker, and nothing else.

A pending message is in flight (a worker claimed it), scheduled (its time is
to come), held (due, but its ordering key or its channel's max_in_flight
keeps every worker off it) or due. ``status``, ``status --check --max-age``,
the Prometheus gauges and the dashboard's overview must all say the same: a
message in a listener or held back is never "due", and its age never fails a
probe.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from helpers import Running, admin_query, wait_until
from test_ordering import Recorder

import pgpubsub
from pgpubsub.channel import Channel, spec_of
from pgpubsub.durable import migrate
from pgpubsub.listen import Registry

# A short lease: the old code called the message due 0.2 s after its claim.
LEASE = 0.2


@dataclass
class Slow(Channel, lock_notifications=True, retry_delay=LEASE, max_attempts=3):
    seq: int


@dataclass
class Keyed(Channel, lock_notifications=True, concurrency=3, retry_delay=LEASE):
    seq: int


@dataclass
class Limited(Channel, lock_notifications=True, concurrency=3, max_in_flight=1, retry_delay=LEASE):
    seq: int


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    migrate(dsn)
    yield dsn


def publish(dsn: str, channel: type[Channel], seq: int, **options: object) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return pgpubsub.notify(channel(seq=seq), conn=conn, **options)  # type: ignore[call-arg]


def counts(dsn: str, channel: type[Channel]) -> tuple[int, int, int, int]:
    """(in flight, held, due, pending) as ``pgpubsub.status`` says."""
    name = spec_of(channel).name
    (c,) = [c for c in pgpubsub.status(dsn).channels if c.channel == name]
    # getattr: on a ChannelCounts without the states, the comparison shows its due count.
    return getattr(c, "in_flight", -1), getattr(c, "held", -1), c.due, c.pending


def gauges(dsn: str, channel: type[Channel]) -> tuple[float, float, float, float]:
    """(in flight, held, due, lag) as the Prometheus collector says at a scrape."""
    pytest.importorskip("prometheus_client")
    from pgpubsub._metrics import QueueCollector

    name = spec_of(channel).name
    found: dict[tuple[str, tuple[str, ...]], float] = {}
    for family in QueueCollector(dsn, [name]).collect():
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    ch = ("channel", name)
    return (
        found[("pgpubsub_in_flight_messages", (ch,))],
        found[("pgpubsub_held_messages", (ch,))],
        found[("pgpubsub_queue_depth", (ch, ("due", "true")))],
        found[("pgpubsub_lag_seconds", (ch,))],
    )


def overview(dsn: str, channel: type[Channel]) -> dict[str, str]:
    """The dashboard overview's cells of ``channel``, the application driven in-process."""
    pytest.importorskip("starlette")
    from test_dashboard_security import Request, serve

    from pgpubsub.dashboard import create_app

    (page,) = serve(create_app(dsn), Request("/"))
    html = page.body.decode()
    assert page.status == 200, html[-2000:]
    name = re.escape(spec_of(channel).name)
    row = re.search(rf'<tr data-channel="{name}">(.*?)</tr>', html, re.S)
    assert row, html
    return dict(re.findall(r'data-col="([a-z_]+)">([^<]*)<', row.group(1)))


def all_say(dsn: str, channel: type[Channel], in_flight: int, held: int, due: int) -> None:
    """status, the gauges and the dashboard agree on in flight / held / due."""
    assert counts(dsn, channel)[:3] == (in_flight, held, due)
    assert gauges(dsn, channel)[:3] == (in_flight, held, due)
    cells = overview(dsn, channel)
    shown = (cells["in_flight"], cells["held"], cells["due"])
    assert shown == (str(in_flight), str(held), str(due))


def test_a_message_in_a_listener_is_in_flight_never_due(db: str) -> None:
    recorder = Recorder()
    registry = Registry()
    registry.add(Slow, recorder)
    recorder.gate(1)
    worker = Running(db, registry)
    try:
        publish(db, Slow, 1)
        wait_until(lambda: recorder.started(1), timeout=10)
        started = time.monotonic()
        # The message's claim lapses (its run_at passes) long before this: the
        # old code called it due, its age growing.
        wait_until(lambda: time.monotonic() - started > 2.5, timeout=5, interval=0.1)
        probe = subprocess.run(
            [sys.executable, "-m", "pgpubsub", "status", "--check", "--max-age", "2", "--dsn", db],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (probe.returncode, probe.stdout, probe.stderr) == (0, "ok\n", "")
        assert counts(db, Slow) == (1, 0, 0, 1)
        all_say(db, Slow, in_flight=1, held=0, due=0)
        assert gauges(db, Slow)[3] == 0.0  # no lag: nothing waits for a worker
        text = subprocess.run(
            [sys.executable, "-m", "pgpubsub", "status", "--dsn", db],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert re.search(r"in flight\s+held\s+due", text), text
        assert not recorder.overlaps()
        assert time.monotonic() - started < 30  # the gate held it all along
    finally:
        recorder.gate(1).set()
        worker.stop()
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message") == [(0,)]  # it completed


def test_messages_behind_a_key_in_a_listener_are_held_not_due(db: str) -> None:
    recorder = Recorder()
    registry = Registry()
    registry.add(Keyed, recorder)
    recorder.gate(1)
    worker = Running(db, registry)
    try:
        for seq in (1, 2, 3):
            publish(db, Keyed, seq, ordering_key="k")
        wait_until(lambda: recorder.started(1), timeout=10)
        wait_until(lambda: counts(db, Keyed) == (1, 2, 0, 3), timeout=5)
        all_say(db, Keyed, in_flight=1, held=2, due=0)
        assert gauges(db, Keyed)[3] == 0.0
        # A message of another key is not held: it runs.
        recorder.gate(9)
        publish(db, Keyed, 9, ordering_key="other")
        wait_until(lambda: recorder.started(9), timeout=10)
        wait_until(lambda: counts(db, Keyed) == (2, 2, 0, 4), timeout=5)
    finally:
        recorder.gate(1).set()
        recorder.gate(9).set()
        wait_until(lambda: len(recorder.order()) == 4, timeout=10)
        worker.stop()
    assert all(9 in pair for pair in recorder.overlaps())  # only across keys


def test_messages_waiting_for_a_max_in_flight_slot_are_held_not_due(db: str) -> None:
    recorder = Recorder()
    registry = Registry()
    registry.add(Limited, recorder)
    recorder.gate(1)
    worker = Running(db, registry)
    try:
        publish(db, Limited, 1)
        wait_until(lambda: recorder.started(1), timeout=10)
        publish(db, Limited, 2)
        publish(db, Limited, 3)
        wait_until(lambda: counts(db, Limited) == (1, 2, 0, 3), timeout=5)
        all_say(db, Limited, in_flight=1, held=2, due=0)
    finally:
        recorder.gate(1).set()
        wait_until(lambda: len(recorder.order()) == 3, timeout=10)
        worker.stop()
    assert recorder.overlaps() == []


def test_held_follows_the_key_lease_and_the_older_message_of_the_key(db: str) -> None:
    """No worker: the states come from the rows and the leases alone."""
    first = publish(db, Keyed, 1, ordering_key="a")
    publish(db, Keyed, 2, ordering_key="a")  # behind an older pending one
    publish(db, Keyed, 3, ordering_key="b")
    publish(db, Keyed, 4, delay=60)  # scheduled
    assert counts(db, Keyed) == (0, 1, 2, 4)
    name = spec_of(Keyed).name
    lease = "INSERT INTO pgpubsub.lease VALUES (%s, 'key', 'b', 'gone#0', now() + %s::interval)"
    admin_query(db, lease, (name, "1 minute"))  # live: its time is to come
    assert counts(db, Keyed) == (0, 2, 1, 4)
    admin_query(db, "DELETE FROM pgpubsub.lease")
    admin_query(db, lease, (name, "-1 minute"))  # lapsed, and no worker holds it
    assert counts(db, Keyed) == (0, 1, 2, 4)
    # A claim whose worker died: in flight (until the claim lapses and it is
    # claimed again), never due, and not counted as waiting.
    admin_query(
        db,
        "UPDATE pgpubsub.message SET unfinished = true, run_at = now() - interval '1 hour' "
        "WHERE id = %s",
        (first,),
    )
    assert counts(db, Keyed) == (1, 1, 1, 4)
    health = pgpubsub.status(db)
    (keyed,) = [c for c in health.channels if c.channel == name]
    assert keyed.scheduled == 1
    assert health.problems(max_age=600) == []
