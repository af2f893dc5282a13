"""Listener functions for typed channels: ``@pgpubsub.listener(Channel)``.

::

    @pgpubsub.listener(PostReads)
    def update_cache(model_id: int, date: datetime.date) -> None: ...

A listener's parameters are a subset of the channel's fields (a listener
taking ``**kwargs`` gets them all); a parameter that is not a field, or a
required field it does not take, is a ConfigurationError at decoration time.
Several listeners may listen to one channel; sync and async functions are both
accepted. Listeners are recorded in a :class:`Registry` (``pgpubsub.registry``
by default) that the worker reads; nothing runs until a worker starts.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .channel import ChannelSpec, resolve_channel
from .errors import ChannelNotFound, ConfigurationError

__all__ = ["ListenerSpec", "Registry", "listener", "registry"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ListenerSpec:
    channel: ChannelSpec
    fn: Callable[..., Any]
    params: tuple[str, ...] | None  # None: every field (the function takes **kwargs)
    is_async: bool
    #: Calls ``fn`` with the message's fields it takes (built once: the hot path).
    call: Callable[[Any], Any] = field(compare=False, repr=False)
    #: Trigger listeners: the row events they take, e.g. {"AFTER INSERT"}; None: every message.
    events: frozenset[str] | None = None

    @property
    def name(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    def accepts(self, message: Any) -> bool:
        return self.events is None or f"{message.when} {message.operation}" in self.events


def _caller(fn: Callable[..., Any], names: tuple[str, ...]) -> Callable[[Any], Any]:
    """``message -> fn(field=value, ...)`` for ``names``, positionally when the signature allows."""
    if not names:
        return lambda message: fn()
    params = list(inspect.signature(fn).parameters.values())
    positional = len(params) >= len(names) and all(
        p.name == name and p.kind is p.POSITIONAL_OR_KEYWORD
        for p, name in zip(params, names, strict=False)
    )
    get = operator.attrgetter(*names)
    if len(names) == 1:
        if positional:
            return lambda message: fn(get(message))
        (only,) = names
        return lambda message: fn(**{only: get(message)})
    if positional:
        return lambda message: fn(*get(message))
    return lambda message: fn(**dict(zip(names, get(message), strict=True)))


def _params(spec: ChannelSpec, fn: Callable[..., Any]) -> tuple[str, ...] | None:
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    params = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            raise ConfigurationError(f"listener {fn.__qualname__}: fields are passed by keyword")
        if p.name not in spec.fields:
            if p.default is p.empty:
                raise ConfigurationError(
                    f"listener {fn.__qualname__} takes {p.name!r}, which {spec.path} does not have"
                )
            continue
        params.append(p.name)
    missing = [name for name in spec.fields if name in spec.required and name not in params]
    if missing:
        raise ConfigurationError(
            f"listener {fn.__qualname__} must take the required field {missing[0]!r} of {spec.path}"
        )
    return tuple(params)


class Registry:
    """Channels and their listeners, in registration order."""

    def __init__(self) -> None:
        self._listeners: dict[type[Any], list[ListenerSpec]] = {}

    def add(
        self,
        channel: type[Any] | str,
        fn: Callable[..., Any],
        events: frozenset[str] | None = None,
    ) -> ListenerSpec:
        spec = resolve_channel(channel)
        params = _params(spec, fn)
        entry = ListenerSpec(
            channel=spec,
            fn=fn,
            params=params,
            is_async=inspect.iscoroutinefunction(fn),
            events=events,
            call=_caller(fn, spec.fields if params is None else params),
        )
        listeners = self._listeners.setdefault(spec.cls, [])
        if not any(existing.fn is fn for existing in listeners):
            listeners.append(entry)
        return entry

    def listeners(self, spec: ChannelSpec) -> list[ListenerSpec]:
        return list(self._listeners.get(spec.cls, []))

    def events(self, spec: ChannelSpec) -> frozenset[str]:
        """The row events the trigger listeners of ``spec`` take (their triggers)."""
        return frozenset().union(*(ls.events or () for ls in self._listeners.get(spec.cls, [])))

    def channels(self) -> list[ChannelSpec]:
        return [resolve_channel(cls) for cls, ls in self._listeners.items() if ls]

    def select(self, paths: list[str] | None) -> list[ChannelSpec]:
        """Registered channels named by dotted path or channel name (a parent class selects
        its subclasses); one that names no registered channel raises ChannelNotFound."""
        everything = self.channels()
        if not paths:
            return everything
        chosen: list[ChannelSpec] = []
        for path in paths:
            named = [s for s in everything if s.name == path]
            if named:
                chosen += [m for m in named if m not in chosen]
                continue
            if "." not in path:
                raise ChannelNotFound(
                    f"no listener is registered for a channel named {path!r} (registered: "
                    f"{', '.join(sorted(s.name for s in everything)) or 'none'})"
                )
            wanted = resolve_channel(path)
            matches = [s for s in everything if issubclass(s.cls, wanted.cls)]
            if not matches:
                raise ChannelNotFound(f"no listener is registered for {path} or its subclasses")
            chosen += [m for m in matches if m not in chosen]
        return chosen

    def clear(self) -> None:
        self._listeners.clear()


registry = Registry()


def listener(channel: type[Any] | str) -> Callable[[F], F]:
    """Register the decorated function as a listener of ``channel`` (class or dotted path)."""

    def decorate(fn: F) -> F:
        registry.add(channel, fn)
        return fn

    return decorate
