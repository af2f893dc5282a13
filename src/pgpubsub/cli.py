"""The ``pgpubsub`` command: ``listen``, ``status``, ``messages``, ``publish``, ``migrate``,
``grant``, ``dashboard``, ``demo``.

``pgpubsub listen myapp.listeners --channels myapp.channels.Orders --processes 2``
imports the listener modules, then runs workers under the supervisor
(:mod:`pgpubsub._supervisor`); ``--worker`` runs one worker in this process
instead (for systemd or Kubernetes, which restart it themselves).
``pgpubsub status`` shows the database, the schema, the queues and the live
workers (``--check`` for probes); ``pgpubsub migrate [modules]`` installs the
schema and the triggers of trigger channels; ``pgpubsub messages`` operates on
stored messages; ``pgpubsub publish`` publishes one. ``--dsn`` defaults to
``$PGPUBSUB_DSN``. The working directory is on the import path (as for
``python -m``), so ``pgpubsub listen myapp.tasks`` finds ``myapp`` there. A
channel is typed as its class's dotted path or as its PostgreSQL name, in
``listen --channels`` as in ``messages --channel`` and ``publish``.

Expected failures end with one or two lines on stderr (``--debug`` adds the
traceback) and an exit code per kind:

====  ==========================================================================
 1    a check failed (``status --check``), a message not found, another error
 2    usage: the command line is wrong
 3    the database is unreachable
 4    the pgpubsub schema is missing or outdated: run ``pgpubsub migrate``
 5    permission denied: the role lacks a privilege (``pgpubsub grant``)
 6    configuration: a bad DSN, a module that does not import, an unknown
      channel, a channel with no listener, a missing extra
130   interrupted (Ctrl-C)
====  ==========================================================================

``listen`` checks its configuration and the schema before any worker starts,
and waits for a database that is down (workers wait too, however long).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from . import _clash as _clash  # checked for the command too
from . import _cli_dashboard, _cli_messages, _cli_publish, _cli_status, _logs, _startup
from ._cli_errors import UsageError, port, seconds
from ._version import version

__all__ = ["main"]

log = logging.getLogger("pgpubsub.cli")


def _tie_to_parent() -> bool:
    """Ask for SIGTERM when this process's parent dies (Linux); False when the supervisor
    that started this worker is gone already.

    The supervisor may die before its worker could ask (while the interpreter
    starts): the kernel sends nothing then, hence the check after asking.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    from ._supervisor import supervisor_pid

    parent = supervisor_pid()
    return parent is None or os.getppid() == parent


async def _watch_parent(parent: int, stop: asyncio.Event, every: float = 1.0) -> None:
    """Set ``stop`` once the supervisor ``parent`` is gone: on platforms without a death
    signal, the only way a worker learns it."""
    while os.getppid() == parent:
        await asyncio.sleep(every)
    log.warning("the supervisor (pid %d) is gone; stopping", parent)
    stop.set()


def _orphaned() -> int:
    log.warning("the supervisor that started this worker is gone; not starting")
    return 0


def serve(
    make_worker: Callable[[], Any],
    grace: float = 30.0,
    probes: Any = None,
    signalled: Callable[[], bool] = lambda: False,
) -> int:
    """Run one worker in this process until SIGTERM/SIGINT, then stop it within ``grace``; 0.

    ``probes`` (a :class:`pgpubsub._probes.Probes`, already serving): the worker's
    state is recorded on its loop for the health endpoint. ``signalled``: whether
    a SIGTERM came while the command started (then nothing starts). A worker
    started by a supervisor stops when the supervisor is gone (see
    :mod:`pgpubsub._supervisor`).
    """
    from ._supervisor import supervisor_pid

    if not _tie_to_parent():
        return _orphaned()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Read once the loop's handlers are in place: a signal before went to the caller's.
        if signalled():
            log.info("stop requested while starting: nothing started")
            return
        tasks = []
        parent = supervisor_pid()
        if parent is not None:
            tasks.append(asyncio.create_task(_watch_parent(parent, stop)))
        worker = make_worker()
        if probes is not None:
            from ._probes import tick

            tasks.append(asyncio.create_task(tick(probes, worker)))
        try:
            await worker.run(stop, grace, exiting=True)  # the process ends after it
        finally:
            for task in tasks:
                task.cancel()

    try:
        asyncio.run(main())
    finally:
        if probes is not None:
            probes.close()
    return 0


def start_probes(options: dict[str, Any]) -> Any:
    """The health endpoint of this worker process when ``--health-port`` is given, else None."""
    if options.get("health_port") is None:
        return None
    from ._probes import Probes

    probes = Probes(options["health_stall"])
    port = probes.serve(options["health_host"], options["health_port"])
    log.info("probes on http://%s:%d/livez and /readyz", options["health_host"], port)
    return probes


def check_probe_options(options: dict[str, Any]) -> None:
    """One worker process per health port: with a supervisor, only ``--processes 1``."""
    if options.get("health_port") is not None and options["processes"] > 1:
        raise UsageError(
            "--health-port reports one worker process: use --processes 1 (or --worker)"
            " and scale with more containers or services"
        )


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


def _is_module(path: str) -> bool:
    try:
        return importlib.util.find_spec(path) is not None
    except (ImportError, ValueError):
        return False


def split_channels(args: argparse.Namespace) -> None:
    """Modules given after ``--channels`` (it takes several values) are modules, not channels."""
    channels = args.channels or []
    args.modules = [*args.modules, *[c for c in channels if _is_module(c)]]
    args.channels = [c for c in channels if c not in args.modules] or None


def load_channels(args: argparse.Namespace) -> list[Any]:
    """Import the listener modules and select the channels to run (configuration errors raise)."""
    from .listen import registry

    split_channels(args)
    import_modules(args.modules)
    return registry.select(args.channels)


def preflight(conninfo: str, channels: list[Any]) -> None:
    """Stop at once when the schema that stored messages need is missing or outdated.

    A database that cannot be reached is not an error here: workers wait for it.
    """
    from ._privileges import check_worker
    from .channel import TriggerChannel
    from .errors import SchemaMissing
    from .health import status

    # Durable channels store messages; plain trigger channels spill wide rows.
    if not any(c.lock or issubclass(c.cls, TriggerChannel) for c in channels):
        return
    check_worker(conninfo, channels)
    health = status(conninfo, timeout=5.0)
    if not health.reachable:
        log.warning("database unreachable (%s); the workers will wait for it", health.error)
    elif not health.schema_current:
        raise SchemaMissing(health.problems()[0])


def start_metrics(port: int | None, host: str, conninfo: str, channels: list[Any]) -> None:
    """Enable this process's metrics, and serve them unless this is a supervisor's child."""
    from . import _metrics, driver
    from ._supervisor import supervised

    if port is None:
        return
    _metrics.enable()  # fails here, once, when prometheus-client is missing
    if not supervised():
        durable = [c.name for c in channels if c.lock]
        _metrics.serve(port, driver.build_conninfo(conninfo), durable, host)


def supervise(
    argv: list[str],
    options: dict[str, Any],
    conninfo: str,
    channels: list[Any],
    signalled: Callable[[], bool] = lambda: False,
) -> int:
    """Run ``argv`` (a worker command) in ``options["processes"]`` children, serving their
    metrics on one port when asked. ``signalled``: whether a SIGTERM came while the
    command started (then no child starts)."""
    from . import _metrics
    from ._supervisor import Supervisor

    folder = None
    if options["metrics_port"] is not None:
        folder = _metrics.MultiprocessDir()
        start_metrics(options["metrics_port"], options["metrics_host"], conninfo, channels)
    try:
        return Supervisor(argv, options["processes"], grace=options["grace"]).run(signalled)
    finally:
        if folder is not None:
            folder.close()


def run_worker(args: argparse.Namespace, signalled: Callable[[], bool] = lambda: False) -> int:
    """One worker process: import the listener modules, then :func:`serve`."""
    from ._supervisor import supervised
    from .worker import Worker

    # Tied to the supervisor before the (maybe slow) imports: its death stops them too.
    if supervised() and not _tie_to_parent():
        return _orphaned()
    channels = load_channels(args)
    start_metrics(args.metrics_port, args.metrics_host, args.dsn, channels)
    if not supervised() and not signalled():  # else the supervisor checked
        preflight(args.dsn, channels)
    probes = start_probes(vars(args))
    return serve(
        lambda: Worker(args.dsn, channels=channels, recover=args.recover),
        args.grace,
        probes,
        signalled,
    )


def cmd_listen(args: argparse.Namespace) -> int:
    if not args.modules and not args.channels:
        raise UsageError(
            "say what to run: the modules that register listeners (pgpubsub listen myapp.tasks)"
            " and/or --channels"
        )
    check_probe_options(vars(args))
    # A SIGTERM from here on (from the package's import on, see _startup) stops the
    # command cleanly, exit 0, starting nothing more.
    term = _startup.EARLY or _startup.TermNoted()
    try:
        if args.worker:
            return run_worker(args, term.received)
        # Configuration errors end the command here, before any child.
        channels = load_channels(args)
        if term.received():
            log.info("stop requested while starting: no worker started")
            return 0
        preflight(args.dsn, channels)
        argv = [sys.executable, "-m", "pgpubsub", *args.argv, "--worker"]
        return supervise(argv, vars(args), args.dsn, channels, term.received)
    finally:
        term.close()


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

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


def cmd_grant(args: argparse.Namespace) -> int:
    from ._privileges import KINDS, grant, statements

    kinds = [k for k in KINDS if getattr(args, k)]
    if not kinds:
        raise UsageError(
            "say what the role is for: --publisher, --awaiter, --worker, --monitor, --operator"
            " and/or --django-writer"
        )
    if args.sql:
        for statement in statements(args.role, kinds, args.revoke):
            print(f"{statement.as_string(None)};")
        if args.revoke:
            print(
                "-- without --sql, a role keeps what it held before its first grant"
                " and what the kinds it keeps need"
            )
        return 0
    for text in grant(args.dsn, args.role, kinds, args.revoke):
        print(f"{text};")
    return 0


def log_options(sp: argparse.ArgumentParser) -> None:
    """``--log-level`` (``--loglevel``, django-pgpubsub's spelling) and ``--log-format``."""
    sp.add_argument(
        "--log-level",
        "--loglevel",
        dest="log_level",
        type=str.upper,
        choices=_logs.LEVELS,
        default="INFO",
        metavar="LEVEL",
        help="debug, info, warning, error or critical (default: info)",
    )
    sp.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text, or JSON lines with ISO 8601 UTC times (default: text)",
    )


def listen_options(sp: argparse.ArgumentParser) -> None:
    """The options of ``listen`` (shared with Django's ``manage.py listen``)."""
    sp.add_argument(
        "--channels",
        nargs="+",
        metavar="CHANNEL",
        help="the channels to run, by dotted path or channel name (default: every channel"
        " with a listener); a parent class selects its subclasses",
    )
    sp.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="worker processes under one supervisor (default: 1)",
    )
    sp.add_argument(
        "--recover",
        action="store_true",
        help="accepted for django-pgpubsub; stored messages are always processed at start",
    )
    sp.add_argument(
        "--grace",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, time workers get to finish the messages in hand (default: 30)",
    )
    sp.add_argument(
        "--worker",
        action="store_true",
        help="run one worker in this process, no supervisor (for systemd, Kubernetes)",
    )
    sp.add_argument(
        "--metrics-port",
        type=port,
        metavar="PORT",
        help="serve Prometheus metrics of all workers on this port (pgpubsub-engine[metrics])",
    )
    sp.add_argument(
        "--metrics-host",
        default="127.0.0.1",  # the metrics name channels and queues: not on the network
        metavar="ADDRESS",
        help="address for --metrics-port (default: 127.0.0.1, this machine only); "
        "0.0.0.0 serves every interface, without authentication: the metrics name "
        "every channel and its queue depth, lag and failures",
    )
    sp.add_argument(
        "--health-port",
        type=port,
        metavar="PORT",
        help="serve GET /livez and /readyz of the worker on this port (probes: answers from"
        " the worker's last-known state, never waits for the database)",
    )
    sp.add_argument(
        "--health-host",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address for --health-port (default: 127.0.0.1; 0.0.0.0 in a container)",
    )
    sp.add_argument(
        "--health-stall",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="/livez fails when the worker's event loop has not turned for this long"
        " (default: 10)",
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors in two lines: what is wrong, and where the help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nRun `{self.prog} --help` for usage.\n")


LISTEN_EXAMPLES = """examples:
  pgpubsub listen myapp.listeners
  pgpubsub listen myapp.listeners --channels myapp.channels.Orders --processes 4
  pgpubsub listen myapp.listeners --worker --metrics-port 9108     (systemd, Kubernetes)
  pgpubsub listen myapp.listeners --worker --health-port 8080 --health-host 0.0.0.0
"""
MIGRATE_EXAMPLES = """examples:
  pgpubsub migrate                          the schema (idempotent; run at each upgrade)
  pgpubsub migrate myapp.listeners          and the triggers of its trigger channels
"""
GRANT_EXAMPLES = """examples:
  pgpubsub grant web_app --publisher --awaiter   publishes, and waits for results
  pgpubsub grant jobs --worker --sql        print the statements only
  pgpubsub grant probe --monitor            may run `pgpubsub status --check`
  pgpubsub grant oncall --operator          may replay, cancel and purge messages
"""
DEMO_EXAMPLES = """examples:
  pgpubsub demo                             an embedded PostgreSQL, removed at the end
  pgpubsub demo --dsn postgresql://localhost/test --messages 5000
"""


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pgpubsub",
        description="PostgreSQL LISTEN/NOTIFY pub/sub and durable message processing.",
        epilog="Run `pgpubsub COMMAND --help` for a command's options and examples.",
    )
    p.add_argument("--version", action="version", version=f"pgpubsub {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--dsn",
            default=os.environ.get("PGPUBSUB_DSN", ""),
            help="libpq conninfo or URI (default: $PGPUBSUB_DSN, then libpq's PG* variables)",
        )
        log_options(sp)
        sp.add_argument(
            "-v", "--debug", action="store_true", help="show the traceback of a failure"
        )

    def command(name: str, helptext: str, examples: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=helptext,
            description=helptext[0].upper() + helptext[1:] + ".",
            epilog=examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        common(sp)
        return sp

    listen = command("listen", "run the listeners of typed channels", LISTEN_EXAMPLES)
    listen.add_argument(
        "modules", nargs="*", metavar="MODULE", help="modules to import (they register listeners)"
    )
    listen_options(listen)
    listen.set_defaults(func=cmd_listen)

    _cli_status.add_parser(sub, common)
    _cli_messages.add_parser(sub, common)
    _cli_publish.add_parser(sub, common)
    _cli_dashboard.add_parser(sub, common)

    migrate = command(
        "migrate",
        "install or upgrade the schema, and the triggers of trigger channels",
        MIGRATE_EXAMPLES,
    )
    migrate.add_argument(
        "modules", nargs="*", metavar="MODULE", help="modules to import (they register listeners)"
    )
    migrate.set_defaults(func=cmd_migrate)

    grant = command(
        "grant",
        "grant a role what it needs: --publisher, --awaiter, --worker, --monitor, --operator,"
        " --django-writer",
        GRANT_EXAMPLES,
    )
    grant.add_argument("role", help="the role (quoted as written)")
    grant.add_argument("--publisher", action="store_true", help="publishes on durable channels")
    grant.add_argument(
        "--awaiter",
        action="store_true",
        help="waits for results (handle.result()): reads outcomes and errors, not payloads",
    )
    grant.add_argument("--worker", action="store_true", help="runs listeners of durable channels")
    grant.add_argument(
        "--monitor",
        action="store_true",
        help="reads counts, ages and workers (`pgpubsub status`, probes), not payloads",
    )
    grant.add_argument(
        "--operator",
        action="store_true",
        help="reads whole messages; replays, cancels and purges them (the dashboard's actions)",
    )
    grant.add_argument(
        "--django-writer",
        action="store_true",
        help="writes to tables watched by Django trigger channels",
    )
    grant.add_argument("--revoke", action="store_true", help="take the privileges back")
    grant.add_argument("--sql", action="store_true", help="print the statements, run nothing")
    grant.set_defaults(func=cmd_grant)

    demo = command(
        "demo", "a live demo (an embedded PostgreSQL unless --dsn is given)", DEMO_EXAMPLES
    )
    demo.add_argument(
        "--messages", type=_count, default=50_000, metavar="N", help="messages to send (50,000)"
    )
    demo.set_defaults(log_level="WARNING")
    demo.set_defaults(func=cmd_demo)
    return p


def _count(text: str) -> int:
    n = int(text.replace(",", "").replace("_", ""))
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return n


def exit_code(exc: BaseException) -> int | None:
    """The documented exit code of an expected failure; None for a bug (traceback)."""
    from . import errors

    codes: list[tuple[type[BaseException], int]] = [
        (UsageError, 2),
        (errors.DatabaseConnectionError, 3),
        (errors.SchemaMissing, 4),
        (errors.PermissionDenied, 5),
        (errors.ConfigurationError, 6),
        (errors.ChannelNotFound, 6),
        (errors.InvalidChannelName, 6),
        (errors.PgPubSubError, 1),
    ]
    return next((code for cls, code in codes if isinstance(exc, cls)), None)


def _hint(exc: BaseException, args: argparse.Namespace) -> str:
    """What to do next, for failures whose message cannot know it."""
    from . import errors

    if isinstance(exc, errors.DatabaseConnectionError):
        if not args.dsn and not any(k in os.environ for k in ("PGHOST", "PGDATABASE")):
            return "no database given: pass --dsn or set PGPUBSUB_DSN"
        return "check --dsn / PGPUBSUB_DSN, and that the server is running"
    return ""


def _working_directory_importable() -> None:
    """Put the working directory first on the import path, as ``python -m`` does."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _working_directory_importable()
    p = parser()
    args = p.parse_args(argv)
    args.argv = argv
    _logs.setup(args.log_level, args.log_format)
    if args.command == "listen" and args.processes < 1:
        p.error("--processes must be at least 1")
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        print(f"pgpubsub {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"pgpubsub {args.command}: error: {exc}", file=sys.stderr)
        hint = _hint(exc, args)
        if hint:
            print(f"pgpubsub {args.command}: {hint}", file=sys.stderr)
        return code
    return result


if __name__ == "__main__":
    sys.exit(main())
