"""``Notifier``: the pgnotifier-style threaded API on the engine.

Code written for pgnotifier runs with its import line changed to
``from pgpubsub import Notifier``::

    n = Notifier({"dbname": "app", "user": "me"})
    n.add_channels(["ch1", "ch3"])
    n.subscribe(42, "ch1", lambda id, channel, payload, pid: print(payload))

Subscriber callbacks receive ``(id, channel, payload, pid)`` with the payload
turned into a Python value by :func:`pgpubsub._values.parse_value` (JSON, then
a Python literal, else the text itself; never code execution, never a crash).

A channel is *active* (LISTENed to) when it is not muted and has at least one
non-muted subscriber. Changes made with ``autorun=True`` (the default) and
every mute/unmute apply at once, without restarting anything (and start the
notifier when a channel becomes active, as pgnotifier's autorun does); with
``autorun=False`` they wait for ``restart()`` (or ``stop()`` and ``start()``),
as pgnotifier documents.

``channels()`` and ``subscribers()`` return pgnotifier's shapes::

    {channel: {"mute": bool, "active": bool, "subscribers": {id: {"mute": bool, "fn": fn}}}}
    {id: {"fn": fn, "channels": {channel: {"active": bool, "mute": bool, "sub_mute": bool}}}}

(``mute`` of the channel, ``sub_mute`` of the subscriber on it). An empty
list of channels, like none, means every channel; a muted subscriber that
subscribes again stays muted.

Unlike pgnotifier: a callback that raises is logged and the others still run;
a payload that parses as nothing is passed as text; ``unsubscribe`` from one
channel leaves the subscriber's other channels working; a dropped connection
is reconnected; ``is_running()`` is true only while the notifier really
listens; ``stop()`` leaves no thread behind; the threads are daemons, so
the interpreter exits without an explicit ``stop()``; and a callback may call
any method of its notifier (mute, unsubscribe, stop): such a call returns at
once and takes effect right after.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ._dispatch import Subscription, handler_name, in_dispatch_thread
from ._loopthread import LoopThread
from ._values import parse_value
from .driver import Notify
from .engine import Engine, GapHandler
from .names import validate_channel

__all__ = ["Notifier"]

log = logging.getLogger("pgpubsub.notifier")


def _log_failure(done: Any) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("notifier change failed: %r", done.exception(), exc_info=done.exception())


SubscriberFn = Callable[[Hashable, str, Any, int], Any]
Channels = str | Iterable[str] | None


@dataclass
class _Subscriber:
    fn: SubscriberFn
    muted: bool = False


@dataclass
class _Channel:
    muted: bool = False
    subscribers: dict[Hashable, _Subscriber] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return not self.muted and any(not s.muted for s in self.subscribers.values())


def _as_list(channels: Channels) -> list[str] | None:
    """The channels named; None for all (nothing given, or an empty list, as pgnotifier)."""
    if channels is None:
        return None
    if isinstance(channels, str):
        return [channels]
    return list(channels) or None


class Notifier:
    """Threaded LISTEN/NOTIFY with subscribers, muting and autorun (see module docs)."""

    def __init__(self, dbconf: dict[str, Any] | str, **engine_options: Any):
        self._dbconf = dbconf
        self._engine_options = engine_options
        self._lock = threading.RLock()
        self._channels: dict[str, _Channel] = {}
        self._loop: LoopThread | None = None
        self._engine: Engine | None = None
        self._subs: dict[str, Subscription] = {}
        self._changing = asyncio.Lock()  # used on the notifier's loop only
        # What dispatch reads, without a lock: rebuilt whole on every change.
        self._targets: dict[str, tuple[tuple[Hashable, SubscriberFn], ...]] = {}
        self._gap_handlers: list[GapHandler] = []

    # -- channels --------------------------------------------------------------

    def add_channels(self, channels: Channels) -> None:
        """Add channels to monitor (no-op for those already there)."""
        with self._lock:
            for name in _as_list(channels) or []:
                self._channels.setdefault(validate_channel(name), _Channel())
        self._apply()

    def remove_channels(self, channels: Channels, autorun: bool = True) -> None:
        """Remove channels (no-op for unknown ones); with autorun, stop listening at once."""
        with self._lock:
            for name in _as_list(channels) or []:
                self._channels.pop(name, None)
        self._apply(listen=autorun)

    def channels(self) -> dict[str, dict[str, Any]]:
        """``{channel: {"mute": bool, "active": bool, "subscribers": {id: {"mute", "fn"}}}}``."""
        with self._lock:
            return {
                name: {
                    "mute": ch.muted,
                    "active": ch.active,
                    "subscribers": {
                        sid: {"mute": s.muted, "fn": s.fn} for sid, s in ch.subscribers.items()
                    },
                }
                for name, ch in self._channels.items()
            }

    # -- subscribers -----------------------------------------------------------

    def subscribe(self, id: Hashable, channel: str, fn: SubscriberFn, autorun: bool = True) -> None:
        """Call ``fn(id, channel, payload, pid)`` for notifications on ``channel``."""
        hash(id)
        with self._lock:
            ch = self._channels.setdefault(validate_channel(channel), _Channel())
            previous = ch.subscribers.get(id)
            ch.subscribers[id] = _Subscriber(fn, muted=previous is not None and previous.muted)
        self._apply(listen=autorun)

    def unsubscribe(self, id: Hashable, channel: str, autorun: bool = True) -> None:
        """Remove subscriber ``id`` from ``channel`` only."""
        with self._lock:
            ch = self._channels.get(channel)
            if ch is not None:
                ch.subscribers.pop(id, None)
        self._apply(listen=autorun)

    def subscribers(self) -> dict[Hashable, dict[str, Any]]:
        """``{id: {"fn": fn, "channels": {channel: {"active", "mute", "sub_mute"}}}}``."""
        with self._lock:
            out: dict[Hashable, dict[str, Any]] = {}
            for name, ch in self._channels.items():
                for sid, s in ch.subscribers.items():
                    entry = out.setdefault(sid, {"fn": s.fn, "channels": {}})
                    entry["fn"] = s.fn  # the latest subscription's
                    entry["channels"][name] = {
                        "active": ch.active,
                        "mute": ch.muted,
                        "sub_mute": s.muted,
                    }
            return out

    # -- muting ----------------------------------------------------------------

    def _set_channel_mute(self, channels: Channels, muted: bool) -> None:
        with self._lock:
            names = _as_list(channels)
            for name in self._channels if names is None else names:
                if name in self._channels:
                    self._channels[name].muted = muted
        self._apply()

    def mute_channels(self, channels: Channels = None) -> None:
        """Stop listening to channels (all when none given); subscribers keep their state."""
        self._set_channel_mute(channels, True)

    def unmute_channels(self, channels: Channels = None) -> None:
        """Listen again to channels (all when none given) that have a non-muted subscriber."""
        self._set_channel_mute(channels, False)

    def muted_channels(self) -> list[str]:
        with self._lock:
            return [name for name, ch in self._channels.items() if ch.muted]

    def non_muted_channels(self) -> list[str]:
        with self._lock:
            return [name for name, ch in self._channels.items() if not ch.muted]

    def _set_subscriber_mute(self, id: Hashable, channels: Channels, muted: bool) -> None:
        with self._lock:
            names = _as_list(channels)
            for name in self._channels if names is None else names:
                sub = self._channels.get(name, _Channel()).subscribers.get(id)
                if sub is not None:
                    sub.muted = muted
        self._apply()

    def mute_subscriber(self, id: Hashable, channels: Channels = None) -> None:
        """Mute subscriber ``id`` on channels (all of its channels when none given)."""
        self._set_subscriber_mute(id, channels, True)

    def unmute_subscriber(self, id: Hashable, channels: Channels = None) -> None:
        """Unmute subscriber ``id`` on channels (all of its channels when none given)."""
        self._set_subscriber_mute(id, channels, False)

    def muted_subscribers(self) -> dict[Hashable, list[str]]:
        """``{id: [channels it is muted on]}``."""
        with self._lock:
            out: dict[Hashable, list[str]] = {}
            for name, ch in self._channels.items():
                for sid, s in ch.subscribers.items():
                    if s.muted:
                        out.setdefault(sid, []).append(name)
            return out

    # -- running ---------------------------------------------------------------

    def add_gap_handler(self, handler: GapHandler) -> None:
        """Call ``handler(gap)`` after each reconnect (in the notifier's loop thread)."""
        self._gap_handlers.append(handler)
        if self._engine is not None:
            self._engine.add_gap_handler(handler)

    def start(self) -> None:
        """Start listening (no-op if running)."""
        with self._lock:
            if self._engine is not None:
                return
            loop = LoopThread("pgpubsub-notifier")
            engine = Engine(**self._conn_args(), **self._engine_options)
            for handler in self._gap_handlers:
                engine.add_gap_handler(handler)
            try:
                loop.run(engine.start(), timeout=None)  # waits for the server (start_timeout)
            except BaseException:
                loop.close()
                raise
            self._loop, self._engine = loop, engine
        self._apply()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and end the notifier's threads (no-op if not running).

        From inside a callback it returns at once; the threads end right after.
        """
        with self._lock:
            loop, engine = self._loop, self._engine
            self._loop = self._engine = None
            self._subs = {}
        if loop is None or engine is None:
            return
        if in_dispatch_thread() is not None:
            done = asyncio.run_coroutine_threadsafe(engine.stop(timeout), loop.loop)
            done.add_done_callback(lambda _: loop.close())
            return
        try:
            loop.run(engine.stop(timeout), timeout=timeout + 5)
        finally:
            loop.close()

    def restart(self) -> None:
        """Stop and start again, applying every pending change."""
        self.stop()
        self.start()

    def is_running(self) -> bool:
        """True only while the notifier is connected and listening."""
        engine, loop = self._engine, self._loop
        return (
            engine is not None
            and loop is not None
            and loop.alive
            and engine.status().state == "listening"
        )

    def status(self) -> Any:
        """The engine's :class:`~pgpubsub.engine.Status`, or None when stopped."""
        engine = self._engine
        return engine.status() if engine is not None else None

    # -- internals -------------------------------------------------------------

    def _conn_args(self) -> dict[str, Any]:
        if isinstance(self._dbconf, str):
            return {"conninfo": self._dbconf}
        return {k: v for k, v in self._dbconf.items() if v is not None}

    def _apply(self, listen: bool = True) -> None:
        """Route to the current subscribers; with ``listen``, LISTEN to the active channels."""
        with self._lock:
            self._targets = {
                name: tuple((sid, s.fn) for sid, s in ch.subscribers.items() if not s.muted)
                for name, ch in self._channels.items()
                if not ch.muted
            }
            if not listen:
                return
            loop, engine = self._loop, self._engine
            if loop is None or engine is None:
                if any(ch.active for ch in self._channels.values()):
                    self.start()  # autorun: the listener thread starts when needed
                return
            active = {name for name, ch in self._channels.items() if ch.active}
        change = self._listen_to(engine, active)
        if in_dispatch_thread() is not None:
            # A callback changing its own notifier: its subscription's thread
            # must return before that subscription can close, so do not wait.
            asyncio.run_coroutine_threadsafe(change, loop.loop).add_done_callback(_log_failure)
        else:
            loop.run(change)

    async def _listen_to(self, engine: Engine, active: set[str]) -> None:
        """Subscribe to the ``active`` channels, and only to them (on the notifier's loop)."""
        async with self._changing:  # one change at a time, each to the state it was given
            if engine is not self._engine:
                return  # stopped since
            for name in sorted(set(self._subs) - active):
                await engine.unsubscribe(self._subs.pop(name))
            for name in sorted(active - set(self._subs)):
                self._subs[name] = await engine.subscribe(
                    name, self._dispatcher(name), batch=True, thread=True
                )

    def _dispatcher(self, channel: str) -> Callable[[list[Notify]], None]:
        def dispatch(batch: list[Notify]) -> None:
            for msg in batch:
                targets = self._targets.get(channel, ())
                if not targets:
                    continue
                payload = parse_value(msg.payload)
                for sid, fn in targets:
                    try:
                        fn(sid, msg.channel, payload, msg.pid)
                    except Exception:
                        log.exception(
                            "subscriber %r (%s) failed on channel %r",
                            sid,
                            handler_name(fn),
                            channel,
                            extra={"channel": channel, "handler": handler_name(fn)},
                        )

        dispatch.__qualname__ = f"Notifier[{channel}]"
        return dispatch
