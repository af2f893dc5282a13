"""``pgpubsub dashboard``: serve the live web dashboard (extra ``pgpubsub-engine[dashboard]``).

It binds 127.0.0.1 by default and then answers only to local host names.
Any other bind needs a token (``--token`` or ``$PGPUBSUB_DASHBOARD_TOKEN``) or
a user and password (``--basic-auth``): every request must carry them.
Replay, cancel and purge need ``--allow-actions``. The port is bound before the
URL is announced: a port that is taken is said so (exit 6), not mistaken for
a database that cannot be reached.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
from typing import Any

from ._cli_errors import UsageError, port
from .errors import ConfigurationError

__all__ = ["add_parser"]

EXAMPLES = """examples:
  pgpubsub dashboard                              http://127.0.0.1:8089/, read-only
  pgpubsub dashboard --allow-actions              with replay, cancel and purge
  PGPUBSUB_DASHBOARD_TOKEN=s3cret pgpubsub dashboard --host 0.0.0.0
                                                  reachable from other machines
                                                  (open http://HOST:8089/?token=s3cret)
"""


def _local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _basic_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UsageError("--basic-auth takes USER:PASSWORD, both non-empty")
    return user, password


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket uvicorn will serve on; a taken port is a ConfigurationError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"port {port} on {host} is taken (another program listens there):"
                " choose another with --port"
            ) from exc
        raise ConfigurationError(f"cannot listen on {host} port {port}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("PGPUBSUB_DASHBOARD_TOKEN") or None
    basic = _basic_auth(args.basic_auth or os.environ.get("PGPUBSUB_DASHBOARD_BASIC_AUTH"))
    local = _local(args.host)
    if not local and not token and not basic:
        raise UsageError(
            f"--host {args.host} makes the dashboard reachable from other machines: "
            "give it a token (--token or PGPUBSUB_DASHBOARD_TOKEN) or a user and password "
            "(--basic-auth or PGPUBSUB_DASHBOARD_BASIC_AUTH)"
        )
    try:
        import uvicorn

        from .dashboard import create_app
        from .dashboard._security import LOCAL_HOSTS
    except ImportError as exc:
        raise ConfigurationError(
            f"the dashboard needs its extra ({exc.name} is missing): "
            "pip install 'pgpubsub-engine[dashboard]'"
        ) from None
    app: Any = create_app(
        args.dsn,
        allow_actions=args.allow_actions,
        token=token,
        basic_auth=basic,
        allowed_hosts=LOCAL_HOSTS if local and not (token or basic) else None,
    )
    listening = _bind(args.host, args.port)
    port = listening.getsockname()[1]  # --port 0: the one the system chose
    mode = "actions enabled" if args.allow_actions else "read-only"
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"pgpubsub dashboard on http://{shown}:{port}/ ({mode})", flush=True)
    with listening:
        # Live tails are endless responses: on SIGTERM they get two seconds, not forever.
        uvicorn.run(
            app,
            fd=listening.fileno(),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
    return 0


def add_parser(sub: Any, common: Any) -> None:
    sp = sub.add_parser(
        "dashboard",
        help="serve the live web dashboard (pgpubsub-engine[dashboard])",
        description="Serve the live web dashboard: channels, queues, workers, "
        "messages and a live tail.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(sp)
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    sp.add_argument("--port", type=port, default=8089, help="port (default: 8089)")
    sp.add_argument(
        "--token",
        help="every request must carry this token (default: $PGPUBSUB_DASHBOARD_TOKEN); "
        "required for a non-local --host",
    )
    sp.add_argument(
        "--basic-auth",
        metavar="USER:PASSWORD",
        help="every request must sign in with these (default: "
        "$PGPUBSUB_DASHBOARD_BASIC_AUTH); an alternative to --token",
    )
    sp.add_argument(
        "--allow-actions",
        action="store_true",
        help="enable replay, cancel and purge (read-only without it)",
    )
    sp.set_defaults(func=run)
