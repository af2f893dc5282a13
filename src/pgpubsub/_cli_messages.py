"""``pgpubsub messages list|show|replay|cancel|purge|pause|resume``: stored messages from the
command line.

``pause --channel X`` stops every worker from starting the channel's messages
(kept until ``resume --channel X``); both say whether the state changed.

Replay replays what it can and prints each message it could not, with why
(exit 1 then). Replay without a filter, cancel of a whole channel and every
purge change many rows: on a terminal they ask first, elsewhere they need ``--yes``;
``--dry-run`` says how many messages they would change and changes nothing.

Each option is the keyword of the same name in :mod:`pgpubsub.messages`
(``--status any`` is ``status="any"``). ``--channel`` takes the channel's
PostgreSQL name or the dotted path of its class; a channel the database has
never seen (no stored message, no worker) is an error (exit 6), not "0 messages".
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

import psycopg

from . import driver, messages
from ._cli_errors import NotFound, UsageError, seconds
from .errors import ChannelNotFound

__all__ = ["add_parser"]

EXAMPLES = """examples:
  pgpubsub messages list                         dead messages, oldest first
  pgpubsub messages list --status pending --channel orders
  pgpubsub messages list --channel myapp.tasks.SendEmail    the class's channel
  pgpubsub messages show 42 43                   payload, error and traceback
  pgpubsub messages replay 42                    run message 42 again
  pgpubsub messages replay --channel orders      every dead message of a channel
  pgpubsub messages cancel 44                    a pending message never runs
  pgpubsub messages purge --older-than 604800 --dry-run
  pgpubsub messages pause --channel orders       no worker starts its messages
  pgpubsub messages resume --channel orders      they start again
"""


def _confirm(args: argparse.Namespace, what: str) -> bool:
    """Whether to go on with a destructive action on ``what`` (refusal explained)."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"refusing to {what} without --yes (stdin is not a terminal)")
    answer = input(f"{what}? [y/N] ").strip().lower()
    return answer in ("y", "yes")


def _list(conn: Any, args: argparse.Namespace) -> int:
    found = messages.list_messages(conn, args.status, args.channel, args.limit)
    if not found:
        where = f" on channel {args.channel!r}" if args.channel else ""
        print(f"no {'' if args.status == 'any' else args.status + ' '}messages{where}")
        return 0
    print("id\tstatus\tchannel\tattempts\tcreated (UTC)\tlast error")
    for m in found:
        error = (m.last_error or "").strip().splitlines()[-1:] or [""]
        print(f"{m.id}\t{m.status}\t{m.channel}\t{m.attempts}\t{_utc(m.created_at)}\t{error[0]}")
    if len(found) == args.limit:
        print(f"(the first {args.limit}; --limit shows more)", file=sys.stderr)
    return 0


def _utc(when: datetime.datetime | None) -> str:
    if when is None:
        return "-"
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _indented(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def _as_text(m: messages.StoredMessage) -> str:
    """One message for a person: fields, then the payload and the traceback as text."""
    try:
        payload = json.dumps(json.loads(m.payload), indent=2, ensure_ascii=False)
    except ValueError:
        payload = m.payload
    lines = [
        f"message {m.id}",
        f"  channel:      {m.channel}",
        f"  status:       {m.status}",
        f"  attempts:     {m.attempts}",
        f"  created:      {_utc(m.created_at)} UTC",
        f"  run at:       {_utc(m.run_at)} UTC",
        f"  completed:    {_utc(m.completed_at)}{' UTC' if m.completed_at else ''}",
    ]
    if m.context is not None:
        lines.append(f"  context:      {json.dumps(m.context, ensure_ascii=False)}")
    lines += ["  payload:", _indented(payload)]
    if m.last_error:
        lines += ["  last error:", _indented(m.last_error)]
    return "\n".join(lines)


def _show(conn: Any, args: argparse.Namespace) -> int:
    if not args.ids:
        raise UsageError("show needs message ids: pgpubsub messages show ID [ID ...]")
    found = {i: messages.get(conn, i) for i in args.ids}
    shown = [m for m in found.values() if m is not None]
    if shown:
        print("\n\n".join(_as_text(m) for m in shown))
    missing = [str(i) for i, m in found.items() if m is None]
    if missing:
        raise NotFound(f"no stored message with id {', '.join(missing)}")
    return 0


def _replay(conn: Any, args: argparse.Namespace) -> int:
    statuses = messages.REPLAYABLE if args.status == "any" else (args.status,)
    if args.dry_run:
        n = messages.count(conn, statuses, args.channel, ids=args.ids or None)
        print(f"would replay {n} message(s)")
        return 0
    if not args.ids and not args.channel:
        n = messages.count(conn, statuses, None)
        if not n:
            print("replayed 0 message(s)")
            return 0
        if not _confirm(args, f"replay all {n} {'/'.join(statuses)} message(s) of every channel"):
            print("nothing replayed")
            return 1
    result = messages.replay(conn, args.ids or None, args.channel, statuses)
    print("\n".join(result.lines()))
    # Not everything asked for was done (each skipped message is printed with why).
    return 1 if result.skipped else 0


def _purge(conn: Any, args: argparse.Namespace) -> int:
    statuses = messages.STATUSES if args.status == "any" else (args.status,)
    n = messages.count(conn, statuses, args.channel, args.older_than, args.ids or None)
    if args.dry_run:
        print(f"would purge {n} message(s)")
        return 0
    if not n:
        print("purged 0 message(s)")
        return 0
    warning = " (not yet processed)" if "pending" in statuses else ""
    if not _confirm(args, f"delete {n} {'/'.join(statuses)} message(s){warning}"):
        print("nothing purged")
        return 1
    total = messages.purge(conn, args.status, args.channel, args.older_than, args.ids or None)
    print(f"purged {total} message(s)")
    return 0


def _cancel(conn: Any, args: argparse.Namespace) -> int:
    if not args.ids and not args.channel:
        raise UsageError("cancel needs message ids or --channel")
    if args.dry_run:
        n = messages.count(conn, ("pending",), args.channel, ids=args.ids or None)
        print(f"would cancel {n} message(s)")
        return 0
    if not args.ids and not _confirm(args, f"cancel every pending message of {args.channel}"):
        print("nothing cancelled")
        return 1
    result = messages.cancel(conn, args.ids or None, args.channel)
    print(f"cancelled {int(result)} message(s)")
    if result.stopping:
        ids = " ".join(str(i) for i in result.stopping)
        print(f"asked {len(result.stopping)} running message(s) to stop: {ids}")
    return 0


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return n


def _pause(conn: Any, args: argparse.Namespace) -> int:
    if not args.channel:
        raise UsageError("pause needs --channel")
    if messages.pause(conn, args.channel):
        print(f"paused {args.channel}: no worker starts its messages until resumed")
    else:
        print(f"{args.channel} was paused already")
    return 0


def _resume(conn: Any, args: argparse.Namespace) -> int:
    if not args.channel:
        raise UsageError("resume needs --channel")
    if messages.resume(conn, args.channel):
        print(f"resumed {args.channel}")
    else:
        print(f"{args.channel} was not paused")
    return 0


ACTIONS = {
    "list": _list,
    "show": _show,
    "replay": _replay,
    "purge": _purge,
    "cancel": _cancel,
    "pause": _pause,
    "resume": _resume,
}


def _channel(conn: Any, args: argparse.Namespace) -> None:
    """``--channel`` as its PostgreSQL name; a name the database has never seen is an error."""
    if args.channel is None:
        return
    given = args.channel
    args.channel = messages.channel_name(given)
    if not messages.known_channel(conn, args.channel):
        also = f" ({given!r} is its dotted path)" if args.channel != given else ""
        raise ChannelNotFound(
            f"no channel {args.channel!r}{also} in this database: no stored message, no worker;"
            " give the channel's name (as `pgpubsub messages list --status any` shows) or the"
            " dotted path of its class"
        )


def run(args: argparse.Namespace) -> int:
    with driver.connect(driver.build_conninfo(args.dsn)) as conn:
        try:
            _channel(conn, args)
            return ACTIONS[args.action](conn, args)
        except psycopg.Error as exc:
            raise driver.translate(exc, f"messages {args.action}") from exc


def add_parser(sub: Any, common: Any) -> None:
    msgs = sub.add_parser(
        "messages",
        help="list, show, replay, cancel or purge stored messages; pause or resume a channel",
        description="Stored messages of durable channels (and spilled trigger rows).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(msgs)
    msgs.add_argument("action", choices=list(ACTIONS), help="what to do")
    msgs.add_argument("ids", nargs="*", type=int, metavar="ID", help="message ids")
    msgs.add_argument(
        "--status",
        choices=[*messages.STATUSES, "any"],
        default="dead",
        help="which messages (default: dead)",
    )
    msgs.add_argument(
        "--channel",
        help="the channel's PostgreSQL name (as `messages list` shows) or its class's dotted path",
    )
    msgs.add_argument(
        "--limit", type=_positive, default=100, help="list at most this many (100)"
    )
    msgs.add_argument(
        "--older-than", type=seconds, metavar="SECONDS", help="purge: only messages older than this"
    )
    msgs.add_argument("--dry-run", action="store_true", help="say how many, change nothing")
    msgs.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    msgs.set_defaults(func=run)
