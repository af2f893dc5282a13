"""The ``pgpubsub`` command: ``listen``, ``demo``, ``migrate`` and ``messages``.

``pgpubsub listen myapp.listeners --channels myapp.channels.Orders --processes 2``
imports the listener modules, then runs workers under the supervisor
(:mod:`pgpubsub.supervisor`). ``pgpubsub migrate [modules]`` installs the schema
and the triggers of trigger channels; ``pgpubsub messages list|show|replay|purge``
operates on stored messages. ``--dsn`` defaults to ``$PGPUBSUB_DSN``.

Expected failures end with one line on stderr and an exit code per kind:
2 usage or configuration (a module that does not import, an unknown channel,
a channel with no listener), 3 database unreachable, 4 schema missing, 5
permission denied, 1 anything else. ``listen`` checks its configuration in
the supervisor before any worker starts, and waits for a database that is
down (workers wait too, however long the outage).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["main"]


class _JsonFormatter(logging.Formatter):
    FIELDS = ("channel", "handler", "message_id", "attempt", "pid")

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        data.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve(make_worker: Callable[[], Any]) -> int:
    """Run one worker in this process until SIGTERM/SIGINT, then stop it gracefully; 0."""
    _die_with_parent()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await make_worker().run(stop)

    asyncio.run(main())
    return 0


def import_modules(modules: list[str]) -> None:
    """Import the user's modules; one that fails is a ConfigurationError naming it."""
    from .errors import ConfigurationError

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigurationError(
                f"cannot import {module!r}: {type(exc).__name__}: {exc}"
            ) from exc


def load_channels(args: argparse.Namespace) -> list[Any]:
    """Import the listener modules and select the channels to run (configuration errors raise)."""
    from .listen import registry

    import_modules(args.modules)
    return registry.select(args.channels)


def run_worker(args: argparse.Namespace) -> int:
    """One worker process: import the listener modules, then :func:`serve`."""
    from .worker import Worker

    channels = load_channels(args)
    return serve(lambda: Worker(args.dsn, channels=channels, recover=args.recover))


def cmd_listen(args: argparse.Namespace) -> int:
    if args.worker:
        return run_worker(args)
    from .supervisor import Supervisor

    load_channels(args)  # configuration errors end the command here, before any child
    argv = [sys.executable, "-m", "pgpubsub", *args.argv, "--worker"]
    return Supervisor(argv, args.processes, grace=args.grace).run()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dsn, args.messages)


def cmd_migrate(args: argparse.Namespace) -> int:
    from . import driver
    from .durable import migrate
    from .triggers import install_triggers

    migrate(args.dsn)
    import_modules(args.modules)
    with driver.connect(driver.build_conninfo(args.dsn), autocommit=False) as conn:
        installed = install_triggers(conn)
    print(f"pgpubsub schema is up to date; {installed} trigger(s) installed")
    return 0


def cmd_messages(args: argparse.Namespace) -> int:
    from . import driver, messages

    with driver.connect(driver.build_conninfo(args.dsn)) as conn:
        if args.action == "list":
            for m in messages.list_messages(conn, args.status, args.channel, args.limit):
                error = (m.last_error or "").strip().splitlines()[-1:] or [""]
                print(
                    f"{m.id}\t{m.status}\t{m.channel}\tattempts={m.attempts}\t"
                    f"created={m.created_at:%Y-%m-%d %H:%M:%S}\t{error[0]}"
                )
        elif args.action == "show":
            found = [messages.get(conn, i) for i in args.ids]
            print(json.dumps([m.__dict__ if m else None for m in found], default=str, indent=2))
            if not all(found):
                return 1
        elif args.action == "replay":
            n = messages.replay(conn, args.ids or None, args.channel, args.status)
            print(f"replayed {n} message(s)")
        else:
            n = messages.purge(conn, args.status, args.channel, args.older_than, args.ids or None)
            print(f"purged {n} message(s)")
    return 0


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_options(sp: argparse.ArgumentParser) -> None:
    """``--log-level`` (``--loglevel``, django-pgpubsub's spelling) and ``--log-format``."""
    sp.add_argument(
        "--log-level",
        "--loglevel",
        dest="log_level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        metavar="LEVEL",
        help="debug, info, warning, error or critical (default: info)",
    )
    sp.add_argument("--log-format", choices=["text", "json"], default="text")


def cmd_grant(args: argparse.Namespace) -> int:
    from .privileges import KINDS, grant, statements

    kinds = [k for k in KINDS if getattr(args, k)]
    if args.sql:
        for statement in statements(args.role, kinds, args.revoke):
            print(f"{statement.as_string(None)};")
        return 0
    for text in grant(args.dsn, args.role, kinds, args.revoke):
        print(f"{text};")
    return 0


def listen_options(sp: argparse.ArgumentParser) -> None:
    """The options of ``listen`` (shared with Django's ``manage.py listen``)."""
    sp.add_argument("--channels", nargs="*", help="dotted paths of channels (default: all)")
    sp.add_argument("--processes", type=int, default=1)
    sp.add_argument(
        "--recover",
        action="store_true",
        help="process stored notifications of durable channels at start",
    )
    sp.add_argument(
        "--grace", type=float, default=30.0, help="seconds workers get to finish on SIGTERM"
    )
    sp.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgpubsub", description="PostgreSQL pub/sub")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--dsn",
            default=os.environ.get("PGPUBSUB_DSN", ""),
            help="libpq conninfo or URI (default: $PGPUBSUB_DSN)",
        )
        log_options(sp)

    listen = sub.add_parser("listen", help="run listeners of typed channels")
    common(listen)
    listen.add_argument("modules", nargs="*", help="modules to import (they register listeners)")
    listen_options(listen)
    listen.set_defaults(func=cmd_listen)

    demo = sub.add_parser("demo", help="a live demo (embedded PostgreSQL unless --dsn)")
    common(demo)
    demo.add_argument("--messages", type=int, default=50_000)
    demo.set_defaults(log_level="WARNING")
    demo.set_defaults(func=cmd_demo)

    migrate = sub.add_parser(
        "migrate", help="install or upgrade the schema, and the triggers of trigger channels"
    )
    common(migrate)
    migrate.add_argument("modules", nargs="*", help="modules to import (they register listeners)")
    migrate.set_defaults(func=cmd_migrate)

    grant = sub.add_parser(
        "grant", help="grant a role what it needs: --publisher, --worker, --django-writer"
    )
    common(grant)
    grant.add_argument("role", help="the role (quoted as written)")
    grant.add_argument("--publisher", action="store_true", help="publishes on durable channels")
    grant.add_argument("--worker", action="store_true", help="runs listeners of durable channels")
    grant.add_argument(
        "--django-writer",
        action="store_true",
        help="writes to tables watched by Django trigger channels",
    )
    grant.add_argument("--revoke", action="store_true", help="take the privileges back")
    grant.add_argument("--sql", action="store_true", help="print the statements, run nothing")
    grant.set_defaults(func=cmd_grant)

    msgs = sub.add_parser("messages", help="list, show, replay or purge stored messages")
    common(msgs)
    msgs.add_argument("action", choices=["list", "show", "replay", "purge"])
    msgs.add_argument("ids", nargs="*", type=int, help="message ids (show, replay, purge)")
    msgs.add_argument("--status", default="dead", help="dead, pending, done or spill")
    msgs.add_argument("--channel", help="PostgreSQL channel name")
    msgs.add_argument("--limit", type=int, default=100)
    msgs.add_argument("--older-than", type=float, help="seconds (purge)")
    msgs.set_defaults(func=cmd_messages)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    setup_logging(args.log_level, args.log_format)
    if args.command == "listen" and args.processes < 1:
        parser().error("--processes must be at least 1")
    try:
        result: int = args.func(args)
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        print(f"pgpubsub {args.command}: error: {exc}", file=sys.stderr)
        return code
    return result


def exit_code(exc: BaseException) -> int | None:
    """The documented exit code of an expected failure; None for a bug (traceback)."""
    from . import errors

    codes: list[tuple[type[BaseException], int]] = [
        (errors.ConfigurationError, 2),
        (errors.ChannelNotFound, 2),
        (errors.InvalidChannelName, 2),
        (errors.DatabaseConnectionError, 3),
        (errors.SchemaMissing, 4),
        (errors.PermissionDenied, 5),
        (errors.PgPubSubError, 1),
    ]
    return next((code for cls, code in codes if isinstance(exc, cls)), None)


if __name__ == "__main__":
    sys.exit(main())
