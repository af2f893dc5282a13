"""The ``pgpubsub`` command: ``listen``, ``demo`` (and ``migrate`` for durable channels).

``pgpubsub listen myapp.listeners --channels myapp.channels.Orders --processes 2``
imports the listener modules, then runs workers under the supervisor
(:mod:`pgpubsub.supervisor`). ``--dsn`` defaults to ``$PGPUBSUB_DSN``.
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


def run_worker(args: argparse.Namespace) -> int:
    """One worker process: import, listen until SIGTERM/SIGINT, exit 0."""
    from .listen import registry
    from .worker import Worker

    _die_with_parent()
    for module in args.modules:
        importlib.import_module(module)
    channels = registry.select(args.channels)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = Worker(args.dsn, channels=channels, recover=args.recover)
        await worker.run(stop)

    asyncio.run(main())
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    if args.worker:
        return run_worker(args)
    from .supervisor import Supervisor

    argv = [sys.executable, "-m", "pgpubsub", *args.argv, "--worker"]
    return Supervisor(argv, args.processes, grace=args.grace).run()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dsn, args.messages)


def cmd_migrate(args: argparse.Namespace) -> int:
    from .durable import migrate

    migrate(args.dsn)
    print("pgpubsub schema is up to date")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgpubsub", description="PostgreSQL pub/sub")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--dsn",
            default=os.environ.get("PGPUBSUB_DSN", ""),
            help="libpq conninfo or URI (default: $PGPUBSUB_DSN)",
        )
        sp.add_argument("--log-level", default="INFO")
        sp.add_argument("--log-format", choices=["text", "json"], default="text")

    listen = sub.add_parser("listen", help="run listeners of typed channels")
    common(listen)
    listen.add_argument("modules", nargs="*", help="modules to import (they register listeners)")
    listen.add_argument("--channels", nargs="*", help="dotted paths of channels (default: all)")
    listen.add_argument("--processes", type=int, default=1)
    listen.add_argument(
        "--recover",
        action="store_true",
        help="process stored notifications of durable channels at start",
    )
    listen.add_argument(
        "--grace", type=float, default=30.0, help="seconds workers get to finish on SIGTERM"
    )
    listen.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    listen.set_defaults(func=cmd_listen)

    demo = sub.add_parser("demo", help="a live demo (embedded PostgreSQL unless --dsn)")
    common(demo)
    demo.add_argument("--messages", type=int, default=50_000)
    demo.set_defaults(log_level="WARNING")
    demo.set_defaults(func=cmd_demo)

    migrate = sub.add_parser("migrate", help="install or upgrade the durable-channel schema")
    common(migrate)
    migrate.set_defaults(func=cmd_migrate)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    setup_logging(args.log_level, args.log_format)
    if args.command == "listen" and args.processes < 1:
        parser().error("--processes must be at least 1")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
