"""OpenTelemetry spans, when ``opentelemetry-api`` is installed (``pgpubsub-engine[otel]``).

* Publishing opens a ``PRODUCER`` span ``publish <channel>``. On durable
  channels its trace context (W3C ``traceparent`` headers, through the
  configured propagator) is stored with the message, in ``pgpubsub.message.trace``.
* Handling a durable message opens a ``CONSUMER`` span ``process <channel>``,
  a child of the publisher's context and linked to its span, so the worker's
  work (and any span its listeners open) joins the publisher's trace.

Without the package, or without an SDK configured (a tracer provider set),
every function here is a no-op that costs a type check.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    from opentelemetry import propagate, trace
except ImportError:  # the extra is not installed
    trace = None  # type: ignore[assignment]

__all__ = ["enabled", "processing", "publishing"]

SYSTEM = "postgresql"


def enabled() -> bool:
    """An SDK is configured: spans are recorded (else they would cost time for nothing)."""
    return trace is not None and not isinstance(
        trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    )


def _tracer() -> Any:
    return trace.get_tracer("pgpubsub")


@contextmanager
def publishing(channel: str, count: int = 1) -> Iterator[str | None]:
    """A publish span; yields the trace context to store with the messages (JSON or None)."""
    if not enabled():
        yield None
        return
    attributes = {
        "messaging.system": SYSTEM,
        "messaging.destination.name": channel,
        "messaging.operation.type": "send",
        "messaging.batch.message_count": count,
    }
    with _tracer().start_as_current_span(
        f"publish {channel}", kind=trace.SpanKind.PRODUCER, attributes=attributes
    ):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield json.dumps(carrier) if carrier else None


@contextmanager
def processing(channel: str, message_id: int, attempt: int, headers: Any) -> Iterator[None]:
    """A span around the listeners of one durable message, in its publisher's trace."""
    if not enabled():
        yield
        return
    parent = propagate.extract(headers) if isinstance(headers, dict) else None
    published = trace.get_current_span(parent).get_span_context() if parent else None
    links = [trace.Link(published)] if published is not None and published.is_valid else []
    attributes = {
        "messaging.system": SYSTEM,
        "messaging.destination.name": channel,
        "messaging.operation.type": "process",
        "messaging.message.id": str(message_id),
        "pgpubsub.attempt": attempt,
    }
    with _tracer().start_as_current_span(
        f"process {channel}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes=attributes,
    ):
        yield
