"""Liveness and readiness of a worker process over HTTP (``pgpubsub listen --health-port``).

``GET /livez``: 200 while the worker itself works: its event loop turned
within the last ``stall`` seconds and every durable processor thread is
alive; else 503. A database that is down or frozen does not fail it (the
worker waits for the database; a restart would not help).

``GET /readyz``: 200 when live and, as last seen, listening (connected to the
database with its channels subscribed); else 503.

Both answer from the worker's last-known state, recorded by a ticker on its
event loop every half second (:func:`tick`): a request never queries the
database and never waits for the loop, so it answers in about a millisecond
whatever the database or the loop are doing. The body is JSON: ``ok``, the
``problems`` (one line each), the loop's age and the last status.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .errors import ConfigurationError

__all__ = ["Probes", "tick"]

TICK = 0.5  # seconds between two records of the worker's state


class Probes:
    """The last-known state of one worker, and the HTTP server that reports it."""

    def __init__(self, stall: float = 10.0) -> None:
        if not stall > TICK:
            raise ConfigurationError(f"--health-stall must be more than {TICK}s, not {stall}")
        self.stall = stall
        # (monotonic time of the last tick, the worker's status then); replaced whole,
        # so a reader in another thread sees one consistent pair.
        self._state: tuple[float, Any] = (time.monotonic(), None)
        self._server: ThreadingHTTPServer | None = None

    def beat(self, status: Any) -> None:
        """Record the worker's status (a WorkerStatus), from its event loop."""
        self._state = (time.monotonic(), status)

    def report(self, ready: bool) -> tuple[bool, dict[str, Any]]:
        """(ok, body) of /livez (``ready`` False) or /readyz (True)."""
        at, status = self._state
        age = time.monotonic() - at
        problems = []
        if age > self.stall:
            problems.append(f"the event loop has not turned for {age:.1f}s (stuck listener?)")
        if status is not None:
            for p in status.durable:
                if not p.alive:
                    problems.append(f"the processor thread of channel {p.channel!r} died")
        if ready:
            if status is None:
                problems.append("the worker is starting")
            elif not status.engine.healthy:
                why = f": {status.engine.last_error}" if status.engine.last_error else ""
                problems.append(f"not listening (state {status.engine.state}{why})")
        body: dict[str, Any] = {"ok": not problems, "problems": problems, "loop_age": age}
        if status is not None:
            body["state"] = status.engine.state
            body["processors"] = {p.channel: p.alive for p in status.durable}
        return not problems, body

    def serve(self, host: str, port: int) -> int:
        """Serve /livez and /readyz in a daemon thread; return the port (0: any free one)."""
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
                path = self.path.split("?")[0]
                if path not in ("/livez", "/readyz", "/healthz"):
                    self.send_error(404, "try /livez or /readyz")
                    return
                ok, body = probes.report(ready=path == "/readyz")
                data = json.dumps(body).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a probe every few seconds is not news

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ThreadingHTTPServer.address_family = family
        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigurationError(
                    f"--health-port {port} on {host} is taken (another program listens there)"
                ) from exc
            raise ConfigurationError(f"cannot serve probes on {host} port {port}: {exc}") from exc
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, name="pgpubsub-probes", daemon=True).start()
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


async def tick(probes: Probes, worker: Any) -> None:
    """Record ``worker.status()`` every :data:`TICK` seconds, on the worker's loop, forever."""
    while True:
        probes.beat(worker.status())
        await asyncio.sleep(TICK)
