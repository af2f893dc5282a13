"""``pgpubsub status``: the database, the schema, each channel's queue and the live workers.

``--check`` makes it a probe: exit 0 when healthy, 3 when the database is
unreachable, 4 when the schema is missing or outdated, 1 when a due message
has waited longer than ``--max-age`` seconds or a live worker reports a
background task that stopped (a channel's scheduler).

Per channel: ``pending`` (all of them) = ``in flight`` (a worker has it) +
``held`` (due, held back by its ordering key or by ``max_in_flight``) +
``due`` (waiting for a worker: what ``oldest due`` and ``--max-age`` are
about) + the scheduled ones (their time is to come). A paused channel
(``pgpubsub messages pause``) shows ``(paused)`` after its name; its due
messages wait for resume, not a worker, so ``--max-age`` leaves them alone.

``WARNING`` lines name what slows every queue down from outside: a session,
prepared transaction or replication slot that holds vacuum back (a transaction
open longer than ``--horizon-age`` seconds), a NOTIFY queue more than half full.
They never fail ``--check``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._cli_errors import CheckFailed
from .errors import ConnectionFailed, SchemaMissing
from .health import HORIZON_AGE, Health, age, since, status

__all__ = ["add_parser"]

EXAMPLES = """examples:
  pgpubsub status                                 what runs, and what waits
  pgpubsub status --json                          the same, for scripts
  pgpubsub status --check --max-age 300           a probe: non-zero when unhealthy
"""


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _print(health: Health) -> None:
    print(f"database  ok (PostgreSQL {health.server_version})")
    state = "ok" if health.schema_current else "OUTDATED: run `pgpubsub migrate`"
    print(f"schema    version {health.schema_version} ({state})")
    for warning in health.warnings:
        print(f"WARNING   {warning}")
    print()
    if health.channels:
        rows = [["channel", "pending", "in flight", "held", "due", "dead", "done", "oldest due"]]
        rows += [
            [
                f"{c.channel} (paused)" if c.paused else c.channel,
                f"{c.pending:,}",
                f"{c.in_flight:,}",
                f"{c.held:,}",
                f"{c.due:,}",
                f"{c.dead:,}",
                f"{c.done:,}",
                age(c.oldest_due_age),
            ]
            for c in health.channels
        ]
        _table(rows)
    else:
        print("no stored messages")
    print()
    live = [w for w in health.workers if w.alive]
    gone = len(health.workers) - len(live)
    print(f"workers   {len(live)} live" + (f", {gone} gone" if gone else ""))
    if health.workers:
        rows = [
            [
                "host",
                "pid",
                "version",
                "state",
                "started",
                "last seen",
                "processed",
                "failed",
                "channels",
            ]
        ]
        rows += [
            [
                w.host,
                str(w.pid),
                w.version,
                "live" if w.alive else "GONE",
                since(w.started_at),
                since(w.last_seen),
                f"{w.processed:,}",
                f"{w.failed:,}",
                ",".join(w.channels),
            ]
            for w in health.workers
        ]
        _table(rows)
        for w in health.workers:
            for error in w.errors if w.alive else []:
                print(f"FAILED    {w.host}:{w.pid}: {error}")


def run(args: argparse.Namespace) -> int:
    health = status(args.dsn, timeout=args.timeout, horizon_age=args.horizon_age)
    problems = health.problems(args.max_age)
    if args.json:
        print(json.dumps({**health.as_dict(), "problems": problems}, default=str, indent=2))
    if not health.reachable:
        raise ConnectionFailed(problems[0])
    if not health.schema_current:
        raise SchemaMissing(problems[0])
    if args.check and problems:
        raise CheckFailed("; ".join(problems))
    if not args.json:
        if args.check:
            print("ok")
        else:
            _print(health)
    return 0


def add_parser(sub: Any, common: Any) -> None:
    sp = sub.add_parser(
        "status",
        help="database, schema, queues and live workers; --check for probes",
        description="Database, schema, per-channel queues and the live workers.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument(
        "--check",
        action="store_true",
        help="print only `ok` or the problem; exit non-zero when unhealthy",
    )
    sp.add_argument(
        "--max-age",
        type=float,
        metavar="SECONDS",
        help="unhealthy when a due message (waiting for a worker: not one in flight or "
        "held back by its key or max_in_flight) has waited longer than this",
    )
    sp.add_argument(
        "--horizon-age",
        type=float,
        default=HORIZON_AGE,
        metavar="SECONDS",
        help="warn about transactions open longer than this (they hold vacuum back; "
        f"default {HORIZON_AGE:g})",
    )
    sp.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="connect and query timeout"
    )
    sp.set_defaults(func=run)
