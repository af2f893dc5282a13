"""``pgpubsub publish CHANNEL JSON``: publish one message from the shell.

``CHANNEL`` is the dotted path of a channel class (``myapp.tasks.SendEmail``,
imported from the working directory) or a PostgreSQL channel name
(``emails``). A class is published as :func:`pgpubsub.notify` publishes it:
the JSON object's keys are its fields (checked), and a durable class stores the
message. A name is published by what the database knows of it: a channel with
stored messages, or a live worker that handles it as durable, gets a stored
message (the JSON as given, checked by the worker's class when it is handled).
Any other name is an error, unless ``--plain`` asks for a plain NOTIFY (which
only the listeners connected now receive): a durable channel's name that the
database does not know yet must not lose the message to a NOTIFY.

The options are :func:`pgpubsub.notify`'s publishing options of the same names
(durable channels only): ``--delay``, ``--run-at``, ``--priority``,
``--dedupe-key``, ``--ordering-key``, ``--limit-key``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import types
from typing import Any

import psycopg

from . import driver
from ._cli_errors import UsageError
from .errors import ConfigurationError

__all__ = ["add_parser"]

EXAMPLES = """examples:
  pgpubsub publish myapp.tasks.SendEmail '{"to": "a@example.com"}'
  pgpubsub publish emails '{"to": "a@example.com"}' --delay 60 --dedupe-key a@example.com
  pgpubsub publish cache_invalidation '{"key": "users"}' --plain     a plain NOTIFY
"""

# A name is durable when a message of it is stored (each status through its
# partial index), or a live worker handles it as durable. Spilled rows belong
# to plain trigger channels.
DURABLE_SQL = """
SELECT EXISTS (SELECT 1 FROM pgpubsub.message WHERE channel = %(c)s AND status = 'pending')
    OR EXISTS (SELECT 1 FROM pgpubsub.message WHERE channel = %(c)s AND status = 'dead')
    OR EXISTS (SELECT 1 FROM pgpubsub.message WHERE channel = %(c)s AND status = 'done')
"""
DURABLE_WORKER_SQL = """
SELECT EXISTS (SELECT 1 FROM pgpubsub.worker
               WHERE (stats -> %(c)s ->> 'durable')::boolean)
"""


def _options(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "delay": args.delay,
        "run_at": args.run_at,
        "priority": args.priority,
        "dedupe_key": args.dedupe_key,
        "ordering_key": args.ordering_key,
        "limit_key": args.limit_key,
    }
    return {k: v for k, v in given.items() if v is not None}


def _run_at(text: str) -> datetime.datetime:
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from exc
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +00:00)")
    return when


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _payload(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_not_json)  # no NaN or Infinity
    except ValueError as exc:
        raise UsageError(f"the message is not JSON: {exc}") from None


def _channel_class(channel: str) -> Any:
    """The channel class of a dotted path whose module imports, or of a channel name
    that this process registered (under Django: the project's channels), else None."""
    from .channel import resolve_channel
    from .listen import registry
    from .messages import _module_exists

    module, _, attr = channel.rpartition(".")
    if module and attr and _module_exists(module):
        return resolve_channel(channel).cls
    return next((s.cls for s in registry.channels() if s.name == channel), None)


def _publish_class(conn: Any, cls: Any, fields: Any, options: dict[str, Any]) -> str:
    from .channel import spec_of
    from .notify import notify

    spec = spec_of(cls)
    if not isinstance(fields, dict):
        raise UsageError(f"{spec.path} takes a JSON object of its fields, not {fields!r}")
    try:  # the channel's own decoder: field names and types checked, as a worker would
        message = spec.decode(json.dumps(fields))
    except Exception as exc:
        raise ConfigurationError(f"{spec.path}: {exc}") from None
    mid = notify(message, conn=conn, **options)
    if spec.lock:
        return f"stored message {mid} on durable channel {spec.name!r} ({spec.path})"
    return f"sent on channel {spec.name!r} ({spec.path}): only listeners connected now receive it"


def _durable(conn: Any, name: str) -> bool:
    with conn.cursor() as cur:
        cur.execute(DURABLE_SQL, {"c": name})
        if cur.fetchone()[0]:
            return True
        try:
            with conn.transaction():
                cur.execute(DURABLE_WORKER_SQL, {"c": name})
                return bool(cur.fetchone()[0])
        except psycopg.errors.InsufficientPrivilege:
            return False  # a publisher role does not read the worker table


def _publish_name(
    conn: Any, name: str, payload: Any, options: dict[str, Any], plain: bool
) -> str:
    from .durable import Options, store
    from .names import NOTIFY_SQL, check_payload, validate_channel

    validate_channel(name)
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    if not plain and _durable(conn, name):
        # Stored as notify() stores it; the worker's class checks the fields.
        spec: Any = types.SimpleNamespace(name=name, path=name, lock=True)
        (mid,) = store(conn, spec, text, None, Options.of(spec, options))
        return f"stored message {mid} on durable channel {name!r}"
    if options:
        raise ConfigurationError(
            f"{', '.join('--' + k.replace('_', '-') for k in options)} need a durable channel, "
            f"and {name!r} has no stored message and no durable worker: give the dotted path"
            " of its class"
        )
    if not plain:
        raise ConfigurationError(
            f"unknown channel {name!r}: no stored message and no durable worker name it; give "
            "the dotted path of its class (myapp.tasks.SendEmail), or --plain to send a plain "
            "NOTIFY that only the listeners connected now receive"
        )
    check_payload(text, name)
    with conn.cursor() as cur:
        cur.execute(NOTIFY_SQL, [name, text])
    return f"sent on plain channel {name!r}: only listeners connected now receive it"


def run(args: argparse.Namespace) -> int:
    payload = _payload(args.payload)
    options = _options(args)
    cls = _channel_class(args.channel)
    with driver.connect(driver.build_conninfo(args.dsn), autocommit=True) as conn:
        try:
            with conn.transaction():
                if cls is not None:
                    said = _publish_class(conn, cls, payload, options)
                else:
                    said = _publish_name(conn, args.channel, payload, options, args.plain)
        except psycopg.Error as exc:
            raise driver.translate(exc, f"publishing on {args.channel}") from exc
    print(said)
    return 0


def add_parser(sub: Any, common: Any) -> None:
    sp = sub.add_parser(
        "publish",
        help="publish one message: a channel's dotted path or name, and its JSON",
        description="Publish one message from the shell.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(sp)
    sp.add_argument("channel", help="dotted path of a channel class, or a channel name")
    sp.add_argument("payload", metavar="JSON", help="the message: a JSON object of its fields")
    sp.add_argument("--delay", type=float, metavar="SECONDS", help="run no sooner than this")
    sp.add_argument("--run-at", type=_run_at, metavar="TIME", help="run no sooner (ISO 8601)")
    sp.add_argument("--priority", type=int, help="higher is claimed first (default: 0)")
    sp.add_argument("--dedupe-key", help="at most one pending message with this key")
    sp.add_argument("--ordering-key", help="messages of one key run one at a time, in order")
    sp.add_argument(
        "--limit-key", help="the key of the channel's key_rate_limit and key_concurrency"
    )
    sp.add_argument(
        "--plain",
        action="store_true",
        help="a channel name the database does not know: send a plain NOTIFY",
    )
    sp.set_defaults(func=run)
