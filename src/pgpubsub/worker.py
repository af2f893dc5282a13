"""The worker: runs the registered listeners of typed channels on one engine.

Each listener gets its own subscription (async listeners run in a task, sync
listeners in a thread), decodes the payload into its channel's dataclass and
is called with the fields it asks for. A payload that does not match the
channel is logged as a SchemaMismatch and the worker goes on.

Plain channels follow LISTEN/NOTIFY: every worker process receives every
message. For one-process-per-message, declare the channel durable
(``lock_notifications = True``): its messages are claimed by exactly one
worker (:mod:`pgpubsub.durable`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .channel import ChannelSpec
from .driver import Notify
from .engine import Engine
from .listen import ListenerSpec, Registry, registry

__all__ = ["Worker"]

log = logging.getLogger("pgpubsub.worker")


def _plain_handler(listener: ListenerSpec) -> Callable[[Notify], Any]:
    decode, call = listener.channel.decode, listener.call
    if listener.is_async:

        async def handle_async(msg: Notify) -> None:
            await call(decode(msg.payload))

        handle_async.__qualname__ = listener.name
        return handle_async

    def handle(msg: Notify) -> None:
        call(decode(msg.payload))

    handle.__qualname__ = listener.name
    return handle


class Worker:
    """Listens to ``channels`` (default: every registered channel) and runs their listeners."""

    def __init__(
        self,
        dsn: str = "",
        *,
        channels: list[ChannelSpec] | None = None,
        registry: Registry = registry,
        recover: bool = False,
        **engine_options: Any,
    ):
        self.registry = registry
        self.channels = channels if channels is not None else registry.channels()
        self.recover = recover
        self.engine = Engine(dsn, **engine_options)
        self._durable: Any = None

    async def start(self) -> None:
        plain = [c for c in self.channels if not c.lock]
        durable = [c for c in self.channels if c.lock]
        for spec in plain:
            for listener in self.registry.listeners(spec):
                await self.engine.subscribe(spec.name, _plain_handler(listener))
        await self.engine.start()
        if durable:
            from .durable import DurableRunner

            self._durable = DurableRunner(self.engine, durable, self.registry)
            await self._durable.start(recover=self.recover)
        log.info("worker listening on %s", ", ".join(c.path for c in self.channels) or "nothing")

    async def stop(self, timeout: float = 10.0) -> None:
        if self._durable is not None:
            await self._durable.stop(timeout)
        await self.engine.stop(timeout)

    async def run(self, stop: asyncio.Event) -> None:
        """Start, run until ``stop`` is set, then stop gracefully."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
