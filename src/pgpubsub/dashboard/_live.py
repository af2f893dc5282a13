"""What the dashboard watches while it runs: message rates and the live tail.

One :class:`~pgpubsub.engine.Engine` (the library's own supervised listening
connection) LISTENs to the plain channels the workers registered and to those
a browser tails. Its handler only counts and hands each notification to the
tails' bounded queues: a tail that cannot keep up loses the oldest lines and
says how many, the listener never waits for a browser.

:class:`Rates` keeps a few minutes of samples (every :data:`SAMPLE_EVERY`
seconds) of what the workers processed, from their registry counts, and of
what was published: counted by the LISTEN for plain channels; for durable
ones, processed plus the growth of the backlog while the counts are exact.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
from dataclasses import dataclass
from typing import Any

from ..engine import Engine
from ._data import ChannelRow

__all__ = ["SAMPLE_EVERY", "Rates", "Tail", "Watcher"]

log = logging.getLogger("pgpubsub.dashboard")

SAMPLE_EVERY = 5.0
HISTORY = 72  # samples: six minutes
TAIL_QUEUE = 200  # lines a tail holds for its browser before it drops the oldest


@dataclass(frozen=True)
class Line:
    at: str  # ISO time the dashboard received it
    payload: str


class Tail:
    """One browser's view of one channel: a bounded queue that drops the oldest."""

    def __init__(self, channel: str, size: int = TAIL_QUEUE):
        self.channel = channel
        self.lines: collections.deque[Line] = collections.deque(maxlen=size)
        self.dropped = 0
        self.ready = asyncio.Event()

    def put(self, line: Line) -> None:
        if len(self.lines) == self.lines.maxlen:
            self.dropped += 1
        self.lines.append(line)
        self.ready.set()

    async def take(self, timeout: float) -> tuple[list[Line], int]:
        """What arrived since the last call (waiting up to ``timeout``), and how many dropped."""
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self.ready.clear()
        lines, dropped = list(self.lines), self.dropped
        self.lines.clear()
        self.dropped = 0
        return lines, dropped


class Rates:
    """Per-channel published and processed rates over the last minutes."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, dict[str, tuple[int, int | None]]]] = (
            collections.deque(maxlen=HISTORY)
        )

    def add(self, at: float, channels: list[ChannelRow], notified: dict[str, int]) -> None:
        """Record totals: processed, and published (None when not known exactly)."""
        totals: dict[str, tuple[int, int | None]] = {}
        for row in channels:
            if not row.durable:
                published: int | None = notified.get(row.name, 0)
            elif not (row.pending.estimated or row.dead.estimated):
                # Each message is processed, still pending or dead: what was published
                # is what was processed plus the growth of the backlog.
                published = row.processed + row.pending.value + row.dead.value
            else:
                published = None
            totals[row.name] = (row.processed, published)
        self.samples.append((at, totals))

    def series(self, channel: str) -> tuple[list[float | None], list[float]]:
        """Published and processed per second between consecutive samples, oldest first."""
        published: list[float | None] = []
        processed: list[float] = []
        points = list(self.samples)
        for (t0, a), (t1, b) in zip(points, points[1:], strict=False):
            if channel not in a or channel not in b or t1 <= t0:
                continue
            (p0, pub0), (p1, pub1) = a[channel], b[channel]
            # A worker that stopped takes its counts with it: never a negative rate.
            processed.append(max(0, p1 - p0) / (t1 - t0))
            both = pub0 is not None and pub1 is not None
            published.append(max(0, pub1 - pub0) / (t1 - t0) if both else None)  # type: ignore[operator]
        return published, processed


class Watcher:
    """The dashboard's LISTEN connection: counts plain channels, feeds the tails."""

    def __init__(self, conninfo: str, *, application: str = "pgpubsub dashboard"):
        self.engine = Engine(conninfo, application_name=application)
        self.notified: dict[str, int] = collections.defaultdict(int)
        self.tails: dict[str, set[Tail]] = collections.defaultdict(set)
        self.counted: set[str] = set()
        self._started: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Connect in the background (waiting for the server as long as it takes)."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        await self.engine.subscribe(None, self._received, batch=True, thread=False)
        await self.engine.start()

    async def stop(self) -> None:
        if self._started is not None:
            self._started.cancel()
        await self.engine.stop(timeout=1.0)

    def _received(self, batch: list[Any]) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        for n in batch:
            self.notified[n.channel] += 1
            for tail in self.tails.get(n.channel, ()):
                tail.put(Line(now, n.payload))

    async def count(self, channels: list[str]) -> None:
        """LISTEN to these plain channels (the registry's), to count what is published."""
        new = [c for c in channels if c not in self.engine.channels]
        self.counted.update(channels)
        if new:
            await self._listen(new)

    async def _listen(self, channels: list[str]) -> None:
        try:
            await self.engine.listen(*channels)
        except Exception as exc:  # a name no channel may have (the registry is a table)
            log.warning("dashboard: cannot LISTEN to %s: %s", channels, exc)

    async def open_tail(self, channel: str) -> Tail:
        tail = Tail(channel)
        self.tails[channel].add(tail)
        if channel not in self.engine.channels:
            await self._listen([channel])
        return tail

    async def close_tail(self, tail: Tail) -> None:
        self.tails[tail.channel].discard(tail)
        if not self.tails[tail.channel]:
            del self.tails[tail.channel]
            if tail.channel not in self.counted:
                try:
                    await self.engine.unlisten(tail.channel)
                except Exception as exc:
                    log.debug("dashboard: UNLISTEN %s: %s", tail.channel, exc)
