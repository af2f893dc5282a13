"""Prometheus metrics of a worker (``pgpubsub listen --metrics-port N``, extra ``metrics``).

Counters (label ``channel``, the PostgreSQL channel name):

========================================  ==============================================
``pgpubsub_messages_delivered_total``     messages handed to listeners (plain), or
                                          claimed (durable)
``pgpubsub_messages_processed_total``     messages whose listeners completed
``pgpubsub_messages_failed_total``        listener calls that raised (durable: attempts)
``pgpubsub_messages_dead_total``          durable messages that ran out of attempts
``pgpubsub_reconnects_total``             listening connections lost and made again
========================================  ==============================================

Histograms: ``pgpubsub_handler_duration_seconds`` (each run of a message's
listeners),
``pgpubsub_claim_batch_size`` (messages per claim of a durable channel).
Gauges read from the database at scrape time (the states of
:mod:`pgpubsub.health`): ``pgpubsub_queue_depth`` (pending messages; label
``due="true"``: waiting for a worker, ``due="false"``: the rest, that is in
flight, held back or scheduled; the two add up to every pending message),
``pgpubsub_in_flight_messages`` (claimed by a worker, outcome not recorded
yet), ``pgpubsub_held_messages`` (due but held back by their ordering key or by
the channel's ``max_in_flight``), ``pgpubsub_lag_seconds`` (age of the oldest
due message: one in a listener or held back never counts),
``pgpubsub_database_up``.

Served on 127.0.0.1 unless another address is given: the metrics carry no
payloads, but they name every channel the worker runs, with its traffic,
failures, queue depth and lag, and the endpoint has no authentication. Serve
every interface (``--metrics-host 0.0.0.0``) only where the network is
trusted (a Kubernetes pod network with a NetworkPolicy, a private VLAN).

Counts are kept by the worker as plain integers (nothing added to the hot
path) and copied into the Prometheus counters every second. Under the
supervisor every child writes them to ``PROMETHEUS_MULTIPROC_DIR`` and the
supervisor serves the sum of all children on one port.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from .errors import ConfigurationError, PgPubSubError
from .health import status

__all__ = ["Metrics", "enable", "metrics", "serve"]

log = logging.getLogger("pgpubsub.metrics")

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500)
DEFAULT_HOST = "127.0.0.1"  # this machine only: the metrics name channels and queue depths


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            "metrics need prometheus-client: pip install 'pgpubsub-engine[metrics]'"
        ) from None
    return prometheus_client


class Metrics:
    """The worker's Prometheus counters and histograms (created once per process)."""

    def __init__(self) -> None:
        prom = _client()
        by_channel = ["channel"]
        self.delivered = prom.Counter(
            "pgpubsub_messages_delivered", "Messages handed to listeners or claimed", by_channel
        )
        self.processed = prom.Counter(
            "pgpubsub_messages_processed", "Messages whose listeners completed", by_channel
        )
        self.failed = prom.Counter(
            "pgpubsub_messages_failed", "Listener calls that raised", by_channel
        )
        self.dead = prom.Counter(
            "pgpubsub_messages_dead", "Durable messages that ran out of attempts", by_channel
        )
        self.reconnects = prom.Counter(
            "pgpubsub_reconnects", "Listening connections lost and made again"
        )
        self.handler_duration = prom.Histogram(
            "pgpubsub_handler_duration_seconds",
            "Time the listeners of one message took",
            by_channel,
            buckets=DURATION_BUCKETS,
        )
        self.claim_batch = prom.Histogram(
            "pgpubsub_claim_batch_size",
            "Messages per claim of a durable channel",
            by_channel,
            buckets=BATCH_BUCKETS,
        )
        self._seen: dict[tuple[str, str], int] = {}

    def sync(self, counts: dict[tuple[str, str], int]) -> None:
        """Bring the counters up to the worker's totals ``{(counter, channel): total}``."""
        for key, total in counts.items():
            delta = total - self._seen.get(key, 0)
            if delta > 0:
                name, channel = key
                counter = getattr(self, name)
                (counter.labels(channel) if channel else counter).inc(delta)
                self._seen[key] = total


_metrics: Metrics | None = None


def enable() -> Metrics:
    """Create this process's metrics (idempotent)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def metrics() -> Metrics | None:
    """This process's metrics, or None when they are not enabled."""
    return _metrics


class QueueCollector:
    """Queue depth, in-flight and held messages and lag of durable channels, read from the
    database at each scrape."""

    def __init__(self, conninfo: str, channels: list[str], timeout: float = 2.0):
        self.conninfo = conninfo
        self.channels = channels
        self.timeout = timeout

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("pgpubsub_database_up", "The database answered this scrape")
        depth = GaugeMetricFamily(
            "pgpubsub_queue_depth", "Pending messages", labels=["channel", "due"]
        )
        lag = GaugeMetricFamily(
            "pgpubsub_lag_seconds",
            "Age of the oldest message waiting for a worker",
            labels=["channel"],
        )
        in_flight = GaugeMetricFamily(
            "pgpubsub_in_flight_messages",
            "Messages claimed by a worker, outcome not recorded yet",
            labels=["channel"],
        )
        held = GaugeMetricFamily(
            "pgpubsub_held_messages",
            "Due messages held back by their ordering key or the channel's max_in_flight",
            labels=["channel"],
        )
        try:
            health = status(self.conninfo, timeout=self.timeout)
        except PgPubSubError as exc:  # e.g. a role that may not read the tables
            log.debug("metrics: cannot read queue depth: %s", exc)
            health = None
        up.add_metric([], 1 if health is not None and health.reachable else 0)
        if health is None or not health.reachable:
            yield up
            return
        counts = {c.channel: c for c in health.channels}
        for channel in self.channels:
            c = counts.get(channel)
            depth.add_metric([channel, "true"], c.due if c else 0)
            depth.add_metric([channel, "false"], c.pending - c.due if c else 0)
            lag.add_metric([channel], (c.oldest_due_age or 0.0) if c else 0.0)
            in_flight.add_metric([channel], c.in_flight if c else 0)
            held.add_metric([channel], c.held if c else 0)
        yield from (up, depth, lag, in_flight, held)


def serve(port: int, conninfo: str, channels: list[str], host: str = DEFAULT_HOST) -> Any:
    """Serve this process's metrics (or all children's, in multi-process mode) on ``port``.

    ``host`` is the address to bind: 127.0.0.1 (this machine) unless given;
    ``0.0.0.0`` or ``::`` for every interface. An empty address is refused
    (prometheus-client cannot resolve it, and "every interface" must be said).
    """
    if not host:
        raise ConfigurationError(
            "--metrics-host is empty: give an address (127.0.0.1 for this machine only, "
            "0.0.0.0 for every interface)"
        )
    prom = _client()
    registry = prom.CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = prom.REGISTRY
    if channels:
        registry.register(QueueCollector(conninfo, channels))
    try:
        server, _thread = prom.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {host} port {port}: {exc}") from exc
    shown = f"[{host}]" if ":" in host else host
    log.info("serving Prometheus metrics on http://%s:%d/metrics", shown, port)
    return server


class MultiprocessDir:
    """The folder the supervisor's children write their metrics to (removed at the end)."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="pgpubsub-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.path

    def close(self) -> None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(self.path, ignore_errors=True)
