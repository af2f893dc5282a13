"""The dashboard's live parts without a browser: a tail that cannot keep up, and rates."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pgpubsub.dashboard._data import ChannelRow, Count
from pgpubsub.dashboard._live import TAIL_QUEUE, Rates, Watcher


def test_a_tail_nobody_reads_never_holds_the_listener_back(dsn: str) -> None:
    async def scenario() -> None:
        watcher = Watcher(dsn)
        watcher.start()
        tail = await watcher.open_tail("firehose")
        other = await watcher.open_tail("quiet")
        for _ in range(500):
            if watcher.engine.status().state == "listening":
                break
            await asyncio.sleep(0.01)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_notify('firehose', i::text) FROM generate_series(1, 5000) i"
            )
            conn.execute("SELECT pg_notify('quiet', 'hello')")
        for _ in range(500):
            if watcher.notified["quiet"] == 1:
                break
            await asyncio.sleep(0.01)
        # Every notification was counted; the tail kept only the newest, and says so.
        assert watcher.notified["firehose"] == 5000
        lines, dropped = await tail.take(timeout=0.1)
        assert len(lines) == TAIL_QUEUE and dropped == 5000 - TAIL_QUEUE
        assert lines[-1].payload == "5000"
        assert [ln.payload for ln in (await other.take(timeout=0.1))[0]] == ["hello"]
        await watcher.close_tail(tail)
        await watcher.close_tail(other)
        assert "firehose" not in watcher.engine.channels  # no browser left: UNLISTEN
        await watcher.stop()

    asyncio.run(scenario())


@pytest.mark.unit
def test_rates_never_go_negative_and_skip_unknown_published() -> None:
    rates = Rates()
    plain = ChannelRow("chat", kind="plain", durable=False)
    durable = ChannelRow("orders", pending=Count(10))
    estimated = ChannelRow("big", pending=Count(50_000, estimated=True))
    for at, processed, notified in ((0.0, 0, 0), (5.0, 100, 50), (10.0, 20, 60)):
        plain.processed = durable.processed = estimated.processed = processed
        rates.add(at, [plain, durable, estimated], {"chat": notified})
    assert rates.series("chat") == ([10.0, 2.0], [20.0, 0.0])  # a worker left: 0, not < 0
    assert rates.series("orders")[1] == [20.0, 0.0]
    assert rates.series("big")[0] == [None, None]  # an estimated backlog: not known
