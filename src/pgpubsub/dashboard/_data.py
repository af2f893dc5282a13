"""What the dashboard reads, each read one indexed statement with a LIMIT.

The table may hold millions of messages, so nothing here scans it:

* the channels that have stored messages come from loose index scans (one
  index probe per channel) of the partial indexes of pending, dead and kept
  messages;
* counts are exact up to :data:`EXACT_UP_TO` (an index-only count that stops
  there); past it the count is the planner's estimate, marked as such
  (:class:`Count`), which the joint channel/status statistics of the schema
  keep close;
* message lists read one status of one channel through its index.

Pending messages are told apart as ``pgpubsub status`` does (the states of
:mod:`pgpubsub.health`): in flight, held (by their ordering key or by the
channel's ``max_in_flight``) and due (waiting for a worker); "oldest due" is
the age of the oldest due one. Due and held messages are read through the
claim index up to their ``run_at``, the held test one index probe each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from ..health import FULL_SQL, KEY_HELD, WORKERS_PARAMS, WORKERS_SQL, WorkerInfo
from ..messages import COLUMNS, StoredMessage

__all__ = [
    "EXACT_UP_TO",
    "ChannelRow",
    "Count",
    "Overview",
    "Reader",
]

#: Counts are exact up to this many messages, estimates above.
EXACT_UP_TO = 1000
MAX_CHANNELS = 500
PAGE = 50

# A loose index scan per partial index (pending, dead, kept): each step of a
# recursion is one index probe for the next channel name.
CHANNELS_SQL = """
WITH RECURSIVE pending AS (
    SELECT (SELECT channel FROM pgpubsub.message WHERE status = 'pending'
            ORDER BY channel LIMIT 1) AS c
    UNION ALL
    SELECT (SELECT m.channel FROM pgpubsub.message m WHERE m.status = 'pending'
            AND m.channel > p.c ORDER BY m.channel LIMIT 1)
    FROM pending p WHERE p.c IS NOT NULL
), dead AS (
    SELECT (SELECT channel FROM pgpubsub.message WHERE status = 'dead'
            ORDER BY channel LIMIT 1) AS c
    UNION ALL
    SELECT (SELECT m.channel FROM pgpubsub.message m WHERE m.status = 'dead'
            AND m.channel > p.c ORDER BY m.channel LIMIT 1)
    FROM dead p WHERE p.c IS NOT NULL
), kept AS (
    SELECT (SELECT channel FROM pgpubsub.message WHERE status IN ('done', 'spill')
            ORDER BY channel LIMIT 1) AS c
    UNION ALL
    SELECT (SELECT m.channel FROM pgpubsub.message m WHERE m.status IN ('done', 'spill')
            AND m.channel > p.c ORDER BY m.channel LIMIT 1)
    FROM kept p WHERE p.c IS NOT NULL
)
SELECT c FROM pending WHERE c IS NOT NULL
UNION SELECT c FROM dead WHERE c IS NOT NULL
UNION SELECT c FROM kept WHERE c IS NOT NULL
ORDER BY 1 LIMIT %(limit)s
"""


def _capped(where: str) -> str:
    return (
        "(SELECT pg_catalog.count(*) FROM (SELECT 1 FROM pgpubsub.message m "  # noqa: S608
        f"WHERE m.channel = c.channel AND {where} LIMIT %(cap)s) s)"
    )


# {full}: true when the channel's max_in_flight slots are all leased live.
_WAITING = "m.status = 'pending' AND NOT m.unfinished AND m.run_at <= pg_catalog.now()"
_STATUS_WHERE = {
    "pending": "m.status = 'pending'",
    "in_flight": "m.status = 'pending' AND m.unfinished",
    "held": f"{_WAITING} AND ({{full}} OR {KEY_HELD})",
    "due": f"{_WAITING} AND NOT ({{full}} OR {KEY_HELD})",
    "dead": "m.status = 'dead'",
    "done": "m.status = 'done'",
}
# Held on a channel with free slots: only messages with an ordering key, read
# through the ordering index (none on a channel without keys: no scan).
_KEY_HELD_WHERE = f"{_WAITING} AND m.ordering_key IS NOT NULL AND {KEY_HELD}"


def _where(status: str, full: str) -> str:
    return _STATUS_WHERE[status].replace("{full}", full)


def _count(status: str) -> str:
    if status == "held":
        return (
            f"CASE WHEN c.full_ THEN {_capped(_WAITING)} "
            f"ELSE {_capped(_KEY_HELD_WHERE)} END"
        )
    return _capped(_where(status, "c.full_"))


COUNTS_SQL = f"""
WITH full_channel AS ({FULL_SQL})
SELECT c.channel, c.full_, {", ".join(_count(s) for s in _STATUS_WHERE)},
    pg_catalog.date_part('epoch', pg_catalog.now() - (
        SELECT pg_catalog.min(m.run_at) FROM pgpubsub.message m
        WHERE m.channel = c.channel AND {_where("due", "c.full_")}))
FROM (
    SELECT u.channel, u.channel IN (SELECT channel FROM full_channel) AS full_
    FROM pg_catalog.unnest(%(channels)s::text[]) AS u(channel)
) c
"""  # noqa: S608 - constant fragments; channels are a bound array
ESTIMATE_SQL = sql.SQL(
    "EXPLAIN (FORMAT JSON) SELECT 1 FROM pgpubsub.message m WHERE m.channel = {channel} AND {where}"
)
# Each status through its own index, in the order that index gives cheaply;
# payloads and errors cut short (message() reads one whole message by id).
_LIST = {
    "pending": ("status = 'pending'", "run_at, id"),
    "dead": ("status = 'dead'", "id DESC"),
    "done": ("status = 'done'", "created_at DESC"),
    "spill": ("status = 'spill'", "created_at DESC"),
}
_BRIEF = COLUMNS.replace("payload", "pg_catalog.left(payload, 300)").replace(
    "last_error", "pg_catalog.right(last_error, 500)"
)
LIST_SQL = {
    status: f"SELECT {_BRIEF} FROM pgpubsub.message "  # noqa: S608 - constant fragments
    f"WHERE channel = %(channel)s AND {where} ORDER BY {order} LIMIT %(limit)s"
    for status, (where, order) in _LIST.items()
}
MESSAGE_SQL = f"SELECT {COLUMNS} FROM pgpubsub.message WHERE id = %s"  # noqa: S608


@dataclass(frozen=True)
class Count:
    value: int
    estimated: bool = False

    def __str__(self) -> str:
        if not self.estimated:
            return f"{self.value:,}"
        for unit, size in (("M", 1_000_000), ("k", 1_000)):
            if self.value >= size:
                return f"~{self.value / size:.1f}{unit}"
        return f"~{self.value}"


PAUSED_SQL = "SELECT channel FROM pgpubsub.channel_pause WHERE channel = ANY(%(channels)s)"

@dataclass
class ChannelRow:
    name: str
    kind: str = "durable"  # plain, durable or trigger (from the workers that listen)
    durable: bool = True
    pending: Count = Count(0)  # all of them: in flight, held, due and scheduled
    in_flight: Count = Count(0)  # claimed by a worker, outcome not recorded yet
    held: Count = Count(0)  # due, held back by their ordering key or max_in_flight
    due: Count = Count(0)  # waiting for a worker
    dead: Count = Count(0)
    done: Count = Count(0)
    oldest_due_age: float | None = None  # of the oldest due message
    full: bool = False  # every max_in_flight slot is leased live
    workers: int = 0  # live workers listening
    processed: int = 0  # by every registered worker since it started
    known_kind: bool = False  # a live worker said what this channel is
    paused: bool = False  # paused (messages.pause): no worker starts its messages


@dataclass
class Overview:
    channels: list[ChannelRow]
    workers: list[WorkerInfo]
    server_version: str


class Reader:
    """The dashboard's reads, on a small pool of autocommit connections."""

    def __init__(self, conninfo: str, *, application: str, statement_timeout: float = 5.0):
        self.pool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=4,
            open=False,
            kwargs={
                "autocommit": True,
                "application_name": application,
                # Every read is written for an index: never let a LIMIT tempt the
                # planner into scanning millions of rows hoping for an early match.
                # Those costs (before PostgreSQL 18, 10^10 per scan disabled) would
                # make every read worth compiling to machine code: 5 s for the
                # overview's counts over the partitions of pgpubsub.message.
                "options": f"-c statement_timeout={int(statement_timeout * 1000)} "
                "-c enable_seqscan=off -c enable_bitmapscan=off -c jit=off",
            },
            timeout=statement_timeout,
            reconnect_timeout=0,  # keep trying while the server is away
        )

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def _all(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(query, params)
            return await cur.fetchall()

    async def workers(self) -> list[WorkerInfo]:
        try:
            rows = await self._all(WORKERS_SQL, WORKERS_PARAMS)
        except psycopg.errors.UndefinedTable:  # a version-1 schema: no registry
            return []
        return [WorkerInfo.from_row(r) for r in rows]

    async def channel_names(self) -> list[str]:
        return [r[0] for r in await self._all(CHANNELS_SQL, {"limit": MAX_CHANNELS})]

    async def counts(self, rows: list[ChannelRow]) -> None:
        """Fill the counts of ``rows``: exact up to EXACT_UP_TO, estimated above."""
        if not rows:
            return
        by_name = {r.name: r for r in rows}
        params = {"channels": list(by_name), "cap": EXACT_UP_TO}
        found: dict[tuple[str, str], Count] = {}
        full = set()
        for name, full_, *values, oldest in await self._all(COUNTS_SQL, params):
            for status, n in zip(_STATUS_WHERE, values, strict=True):
                found[(name, status)] = Count(n)
            by_name[name].oldest_due_age = oldest if oldest is not None and oldest > 0 else None
            by_name[name].full = full_
            if full_:
                full.add(name)
        for name in await self._paused(list(by_name)):
            by_name[name].paused = True
        wanted = [k for k, c in found.items() if c.value >= EXACT_UP_TO]
        found.update(await self._estimates(wanted, full))
        for row in rows:
            row.pending, row.in_flight, row.held, row.due, row.dead, row.done = (
                found[(row.name, status)] for status in _STATUS_WHERE
            )

    async def _paused(self, names: list[str]) -> list[str]:
        """Which of ``names`` are paused (none on a schema, or a grant, from before pauses)."""
        try:
            return [r[0] for r in await self._all(PAUSED_SQL, {"channels": names})]
        except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege):
            return []

    async def _estimates(
        self, wanted: list[tuple[str, str]], full: set[str]
    ) -> dict[tuple[str, str], Count]:
        """The planner's row estimates, all in one round trip (EXPLAIN takes no bound
        parameters: each channel is a quoted literal)."""
        if not wanted:
            return {}
        query = sql.SQL(";").join(
            ESTIMATE_SQL.format(
                channel=sql.Literal(channel),
                where=sql.SQL(_where(status, "true" if channel in full else "false")),
            )
            for channel, status in wanted
        )
        out = {}
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.execute(query)
            for key in wanted:
                row = await cur.fetchone()
                assert row is not None  # EXPLAIN returns one row
                plan: Any = json.loads(row[0]) if isinstance(row[0], str) else row[0]
                rows = int(plan[0]["Plan"]["Plan Rows"])
                out[key] = Count(max(rows, EXACT_UP_TO), estimated=True)
                cur.nextset()
        return out

    async def overview(self) -> Overview:
        workers = await self.workers()
        rows = _from_workers(workers)
        for name in await self.channel_names():
            rows.setdefault(name, ChannelRow(name))
        channels = sorted(rows.values(), key=lambda r: r.name)
        await self.counts(channels)
        async with self.pool.connection() as conn:
            server = conn.info.parameter_status("server_version") or "?"
        return Overview(channels, workers, server)

    async def channel(self, name: str) -> ChannelRow:
        """One channel as the overview shows it."""
        row = _from_workers(await self.workers()).get(name) or ChannelRow(name)
        await self.counts([row])
        return row

    async def messages(self, channel: str, status: str, limit: int = PAGE) -> list[StoredMessage]:
        rows = await self._all(LIST_SQL[status], {"channel": channel, "limit": limit})
        return [StoredMessage(*r) for r in rows]

    async def message(self, message_id: int) -> StoredMessage | None:
        rows = await self._all(MESSAGE_SQL, (message_id,))
        return StoredMessage(*rows[0]) if rows else None


def _from_workers(workers: list[WorkerInfo]) -> dict[str, ChannelRow]:
    """Every channel the workers name: its kind (as live workers say), their counts."""
    rows: dict[str, ChannelRow] = {}
    for w in workers:
        for name in w.channels:
            row = rows.setdefault(name, ChannelRow(name))
            info = w.stats.get(name, {})
            row.processed += int(info.get("processed", 0))
            if w.alive:
                row.workers += 1
                if info.get("kind"):
                    row.kind, row.durable = info["kind"], bool(info.get("durable"))
                    row.known_kind = True
    return rows
