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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _metrics, driver
from ._dispatch import Subscription
from ._heartbeat import Heartbeat
from ._privileges import check_worker
from ._processor import ProcessorStatus
from ._schedule import Scheduler
from ._version import version
from .channel import ChannelSpec, TriggerChannel
from .driver import Notify
from .durable import DurableRunner
from .engine import Engine, Status
from .listen import ListenerSpec, Registry, registry
from .session import Session
from .triggers import PURGE_SPILL_SQL, SPILL_PREFIX, SPILL_TTL, read_spill

__all__ = ["Worker", "WorkerStatus"]

log = logging.getLogger("pgpubsub.worker")


@dataclass(frozen=True)
class WorkerStatus:
    engine: Status
    durable: tuple[ProcessorStatus, ...]
    #: Background tasks (a channel's scheduler...) that stopped: what stopped, and why.
    failures: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        """Listening, every durable channel's processor running, no background task failed."""
        return self.engine.healthy and all(p.alive for p in self.durable) and not self.failures


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


def _timed(handler: Callable[[Notify], Any], observe: Callable[[float], None]) -> Any:
    """``handler``, its duration observed (only when metrics are enabled)."""
    if asyncio.iscoroutinefunction(handler):

        async def timed_async(msg: Notify) -> None:
            started = time.perf_counter()
            try:
                await handler(msg)
            finally:
                observe(time.perf_counter() - started)

        timed_async.__qualname__ = handler.__qualname__
        return timed_async

    def timed(msg: Notify) -> None:
        started = time.perf_counter()
        try:
            handler(msg)
        finally:
            observe(time.perf_counter() - started)

    timed.__qualname__ = handler.__qualname__
    return timed


class Worker:
    """Listens to ``channels`` (default: every registered channel) and runs their listeners.

    Stored messages of durable channels are always processed at start;
    ``recover`` (the seed's ``--recover``) is accepted and changes nothing.
    While it runs, the worker keeps its row in the worker registry
    (``pgpubsub status``; ``register=False`` to stay out of it) and, when
    :mod:`pgpubsub._metrics` are enabled, its Prometheus counters.
    """

    def __init__(
        self,
        dsn: str = "",
        *,
        channels: list[ChannelSpec] | None = None,
        registry: Registry = registry,
        recover: bool = False,
        session_factory: Callable[[], Session] | None = None,
        register: bool = True,
        **engine_options: Any,
    ):
        self.registry = registry
        self.channels = channels if channels is not None else registry.channels()
        self.session_factory = session_factory
        self.engine = Engine(dsn, **engine_options)
        self.heartbeat = Heartbeat(self.engine.conninfo, self.channel_stats) if register else None
        self._plain: list[Subscription] = []
        self._durable: DurableRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # The background tasks that stopped: what -> (its channel, or "", and why).
        self._failures: dict[str, tuple[str, str]] = {}
        self._schedulers: list[Scheduler] = []

    def _background(self, what: str, coro: Any, channel: str = "") -> None:
        """Run ``coro`` (meant to run until cancelled) as a task whose end is noticed."""
        task = asyncio.create_task(coro, name=f"pgpubsub: {what}")
        task.add_done_callback(lambda task: self._ended(task, what, channel))
        self._tasks.append(task)

    def _ended(self, task: asyncio.Task[None], what: str, channel: str) -> None:
        """A background task ended other than by stop(): logged now, shown in status()
        and in the worker registry (``pgpubsub status``)."""
        if task.cancelled():
            return
        exc = task.exception()
        reason = driver.one_line(exc) if exc is not None else "it returned"
        log.error("%s stopped: %s; the worker goes on without it", what, reason, exc_info=exc)
        self._failures[what] = (channel, f"{what} stopped: {reason}")

    async def start(self) -> None:
        plain = [c for c in self.channels if not c.lock]
        durable = [c for c in self.channels if c.lock]
        log.info(
            "worker starting: pgpubsub %s, %d channel(s) (%d durable)",
            version(),
            len(self.channels),
            len(durable),
        )
        # A role that lacks a privilege its channels need stops here, saying
        # which GRANT to run, rather than running without its schedules.
        await asyncio.to_thread(check_worker, self.engine.conninfo, self.channels)
        metrics = _metrics.metrics()
        for spec in plain:
            for listener in self.registry.listeners(spec):
                handler = _plain_handler(listener, self.engine.conninfo)
                if metrics is not None:
                    handler = _timed(handler, metrics.handler_duration.labels(spec.name).observe)
                self._plain.append(await self.engine.subscribe(spec.name, handler))
        await self.engine.start()
        if durable:
            self._durable = DurableRunner(
                self.engine,
                durable,
                self.registry,
                session_factory=self.session_factory,
                worker_id=self.heartbeat.id if self.heartbeat is not None else None,
            )
            await self._durable.start()
        spilling = [c.name for c in plain if issubclass(c.cls, TriggerChannel)]
        if spilling:
            self._background("purging spilled trigger events", self._purge_spills(spilling))
        for spec in durable:
            if spec.cls.schedule is not None:
                scheduler = Scheduler(self.engine.conninfo, spec)
                self._schedulers.append(scheduler)
                self._background(f"schedule of {spec.path}", scheduler.run(), spec.name)
        if self.heartbeat is not None:
            self._background("worker registry", self.heartbeat.run())
        if metrics is not None:
            self._background("metrics", self._sync_metrics(metrics))
        log.info(
            "worker listening on %d channel(s): %s",
            len(self.channels),
            ", ".join(c.path for c in self.channels) or "nothing",
        )

    def counts(self) -> dict[tuple[str, str], int]:
        """This worker's totals since it started: ``{(counter, channel): n}``."""
        out: dict[tuple[str, str], int] = {("reconnects", ""): self.engine.reconnects}
        for sub in self._plain:
            channel = sub.channel or ""
            for name, n in (
                ("delivered", sub.delivered),
                ("processed", sub.delivered - sub.errors),
                ("failed", sub.errors),
            ):
                out[(name, channel)] = out.get((name, channel), 0) + n
        for proc in self._durable.processors if self._durable is not None else []:
            channel = proc.spec.name  # several processors per channel with concurrency > 1
            for name, n in (
                ("delivered", proc.claimed),
                ("processed", proc.processed),
                ("failed", proc.failed),
                ("dead", proc.dead),
            ):
                out[(name, channel)] = out.get((name, channel), 0) + n
        return out

    def totals(self) -> tuple[int, int]:
        """Messages processed and failed by this worker, every channel together."""
        counts = self.counts()
        return (
            sum(n for (name, _), n in counts.items() if name == "processed"),
            sum(n for (name, _), n in counts.items() if name == "failed"),
        )

    def channel_stats(self) -> dict[str, dict[str, Any]]:
        """Per channel: its kind and this worker's processed and failed counts (the registry),
        its ``max_in_flight`` when it has one, ``error`` when a background task of the
        channel (its scheduler) stopped, and ``warning`` when its processors cannot do all
        they should (free stored messages' space)."""
        counts = self.counts()
        stats: dict[str, dict[str, Any]] = {}
        for spec in self.channels:
            stats[spec.name] = {
                "kind": "trigger"
                if issubclass(spec.cls, TriggerChannel)
                else ("durable" if spec.lock else "plain"),
                "durable": bool(spec.lock),
                "processed": counts.get(("processed", spec.name), 0),
                "failed": counts.get(("failed", spec.name), 0),
            }
            # The limit is in no table: `status` and the dashboard read it here to
            # tell messages held back by a full max_in_flight from due ones.
            limit = getattr(spec.cls, "max_in_flight", None) if spec.lock else None
            if limit is not None:
                stats[spec.name]["max_in_flight"] = int(limit)
        for channel, error in self._problems():
            if channel in stats:
                stats[channel]["error"] = error
        for proc in self._durable.processors if self._durable is not None else []:
            if proc.warning is not None:
                stats[proc.spec.name]["warning"] = proc.warning
        return stats

    def _problems(self) -> list[tuple[str, str]]:
        """(channel or "", what is wrong): tasks that stopped, schedules failing to store."""
        failing = [(s.spec.name, s.failing) for s in self._schedulers if s.failing]
        return [*self._failures.values(), *failing]

    async def _sync_metrics(self, metrics: _metrics.Metrics, every: float = 1.0) -> None:
        while True:
            metrics.sync(self.counts())
            await asyncio.sleep(every)

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
        return WorkerStatus(
            self.engine.status(),
            tuple(p.status() for p in durable),
            tuple(error for _, error in self._problems()),
        )

    async def stop(self, timeout: float = 10.0, exiting: bool = False) -> None:
        """Stop taking messages; finish the ones in hand within ``timeout`` seconds.

        ``exiting``: the process exits after this (``pgpubsub listen``). A durable
        batch whose listener still runs after ``timeout`` is then given back
        before the exit: the messages no listener runs are pending again,
        uncharged; the one in its listener keeps its attempt (see the durable
        guide). Otherwise such a listener goes on in its thread and its batch
        commits when it returns.
        """
        log.info("worker draining: finishing the messages in hand (up to %.0fs)", timeout)
        for task in self._tasks:
            task.cancel()
        # A task that had failed was logged when it did: its error must not stop the drain.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._durable is not None:
            await self._durable.stop(timeout, exiting)
        await self.engine.stop(timeout)
        metrics = _metrics.metrics()
        if metrics is not None:
            metrics.sync(self.counts())
        if self.heartbeat is not None:
            await self.heartbeat.remove()
        processed, failed = self.totals()
        log.info("worker stopped: %d message(s) processed, %d failed", processed, failed)

    async def run(self, stop: asyncio.Event, grace: float = 10.0, exiting: bool = False) -> None:
        """Start, run until ``stop`` is set, then stop gracefully within ``grace`` seconds
        (``exiting``: as for :meth:`stop`)."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop(grace, exiting)
