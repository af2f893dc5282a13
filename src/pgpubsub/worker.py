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
from dataclasses import dataclass
from typing import Any

from . import driver
from .channel import ChannelSpec, TriggerChannel
from .driver import Notify
from .durable import DurableRunner
from .engine import Engine, Status
from .listen import ListenerSpec, Registry, registry
from .processor import ProcessorStatus
from .session import Session
from .triggers import PURGE_SPILL_SQL, SPILL_PREFIX, SPILL_TTL, read_spill

__all__ = ["Worker", "WorkerStatus"]

log = logging.getLogger("pgpubsub.worker")


@dataclass(frozen=True)
class WorkerStatus:
    engine: Status
    durable: tuple[ProcessorStatus, ...]

    @property
    def healthy(self) -> bool:
        """Listening, and every durable channel's processor running."""
        return self.engine.healthy and all(p.alive for p in self.durable)


def _plain_handler(listener: ListenerSpec, conninfo: str) -> Callable[[Notify], Any]:
    decode, call, accepts = listener.channel.decode, listener.call, listener.accepts
    if listener.events is not None:  # a trigger channel: events may be spilled, and filtered
        if listener.is_async:

            async def handle_event_async(msg: Notify) -> None:
                payload: str | None = msg.payload
                if msg.payload.startswith(SPILL_PREFIX):
                    payload = await asyncio.to_thread(
                        read_spill, conninfo, msg.payload, msg.channel
                    )
                if payload is None:
                    return
                message = decode(payload)
                if accepts(message):
                    await call(message)

            handle_event_async.__qualname__ = listener.name
            return handle_event_async

        def handle_event(msg: Notify) -> None:
            payload = read_spill(conninfo, msg.payload, msg.channel)
            if payload is None:
                return
            message = decode(payload)
            if accepts(message):
                call(message)

        handle_event.__qualname__ = listener.name
        return handle_event

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
    """Listens to ``channels`` (default: every registered channel) and runs their listeners.

    Stored messages of durable channels are always processed at start;
    ``recover`` (the seed's ``--recover``) is accepted and changes nothing.
    """

    def __init__(
        self,
        dsn: str = "",
        *,
        channels: list[ChannelSpec] | None = None,
        registry: Registry = registry,
        recover: bool = False,
        session_factory: Callable[[], Session] | None = None,
        **engine_options: Any,
    ):
        self.registry = registry
        self.channels = channels if channels is not None else registry.channels()
        self.session_factory = session_factory
        self.engine = Engine(dsn, **engine_options)
        self._durable: DurableRunner | None = None
        self._janitor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        plain = [c for c in self.channels if not c.lock]
        durable = [c for c in self.channels if c.lock]
        for spec in plain:
            for listener in self.registry.listeners(spec):
                await self.engine.subscribe(
                    spec.name, _plain_handler(listener, self.engine.conninfo)
                )
        await self.engine.start()
        if durable:
            self._durable = DurableRunner(
                self.engine, durable, self.registry, session_factory=self.session_factory
            )
            await self._durable.start()
        spilling = [c.name for c in plain if issubclass(c.cls, TriggerChannel)]
        if spilling:
            self._janitor = asyncio.create_task(self._purge_spills(spilling))
        log.info("worker listening on %s", ", ".join(c.path for c in self.channels) or "nothing")

    async def _purge_spills(self, channels: list[str], every: float = 60.0) -> None:
        """Delete the wide events of plain trigger channels once their listeners had them."""
        while True:
            try:
                conn = await driver.connect_async(self.engine.conninfo)
                async with conn:
                    await conn.execute(PURGE_SPILL_SQL, (channels, SPILL_TTL))
            except Exception as exc:  # the next round tries again
                log.warning("could not purge spilled trigger events: %s", exc)
            await asyncio.sleep(every)

    def status(self) -> WorkerStatus:
        """The engine's status and each durable processor's, for health checks."""
        durable = self._durable.processors if self._durable is not None else []
        return WorkerStatus(self.engine.status(), tuple(p.status() for p in durable))

    async def stop(self, timeout: float = 10.0) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
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
