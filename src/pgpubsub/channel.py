"""Typed channels: dataclasses whose fields are the payload schema.

::

    @dataclass
    class PostReads(Channel):
        model_id: int
        date: datetime.date

Payloads are JSON objects of the fields, encoded and decoded by msgspec
straight into the declared types: primitives, ``Optional``, ``date`` and
``datetime`` (naive or aware, kept as they were), ``UUID``, ``Decimal``,
enums, ``bytes``, lists, dicts, sets and tuples of these, nested dataclasses,
defaults, and modules using ``from __future__ import annotations``. A field
whose default is None accepts None whatever its annotation
(``date: datetime.date = None``, as django-pgpubsub writes it). A payload
that does not match raises :class:`~pgpubsub.errors.SchemaMismatch`, whose
message shows the payload (its first 200 characters).

The wire name (the PostgreSQL channel) defaults to the class's dotted path,
``module.QualName``; when that is over 63 bytes it is shortened to its tail
plus a 64-bit hash of the whole path, so it stays readable and stable. Set
your own with a class keyword, which keeps the class namespace free for
fields::

    @dataclass
    class Orders(Channel, name="orders", lock_notifications=True, max_attempts=5):
        order_id: int

Channel options (class keywords, or class attributes of the same name):
``lock_notifications``, ``max_attempts``, ``retry_delay``, ``retry_max_delay``,
``retention``, ``concurrency``, ``max_in_flight``, ``timeout``, ``rate_limit``,
``key_rate_limit``, ``key_concurrency``, ``schedule``, ``timezone`` and ``results``
(durable channels, :mod:`pgpubsub.durable`).
:class:`TriggerChannel` channels carry the row events of a table.

The options are checked when the class is declared (and again on first use,
for attributes changed since): ``lock_notifications`` True or False;
``max_attempts`` an int from 1 to 2**31 - 1; ``retry_delay``,
``retry_max_delay`` and ``retention`` seconds (an int or a float, finite, from
0 to a century), ``retry_max_delay`` no less than ``retry_delay``;
``concurrency`` an int from 1 to 256 (each a thread and a connection);
``max_in_flight`` None or an int from 1 to 10,000 (each slot a lease row);
``timeout`` None or seconds over 0 up to a day; ``rate_limit`` None, ``"N/unit"``
(unit ``s``, ``m``, ``h`` or ``d``, or ``second``, ``minute``, ``hour``, ``day``) or
``(N, timedelta)``, N from 1 to 1,000,000, the period from 1 ms to a day;
``key_rate_limit`` the same forms as ``rate_limit``; ``key_concurrency`` None or an
int from 1 to 10,000 (each slot in use a lease row); ``results`` True or False (a class
attribute ``Result``, any type msgspec can encode, types the listener's return value). A bool
is not an int here. A bad value raises :class:`~pgpubsub.errors.ConfigurationError`
naming the channel, the option and the value.

``lock_notifications = True`` as a class attribute (the django-pgpubsub
spelling) works too: see :mod:`pgpubsub.durable`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from ._cron import check as check_schedule
from .errors import ChannelNotFound, ConfigurationError, SchemaMismatch
from .names import MAX_NAME_BYTES, validate_channel

__all__ = ["Channel", "ChannelSpec", "TriggerChannel", "resolve_channel", "spec_of"]

_SETTINGS = (
    "lock_notifications",
    "max_attempts",
    "retry_delay",
    "retry_max_delay",
    "retention",
    "concurrency",
    "max_in_flight",
    "timeout",
    "rate_limit",
    "key_rate_limit",
    "key_concurrency",
    "schedule",
    "timezone",
    "results",
)
_OPTIONS = ("name", "table", *_SETTINGS)


class Channel:
    """Base class of typed channels (declare subclasses as dataclasses)."""

    lock_notifications: ClassVar[bool] = False
    max_attempts: ClassVar[int] = 5
    retry_delay: ClassVar[float] = 1.0
    retry_max_delay: ClassVar[float] = 300.0
    #: Seconds a completed durable message is kept (status ``done``); 0 deletes it at once.
    retention: ClassVar[float] = 0.0
    #: Durable messages one worker process handles at once (each in its own transaction).
    concurrency: ClassVar[int] = 1
    #: At most this many messages of the channel handled at once across every worker
    #: (None: no limit); enforced in the database.
    max_in_flight: ClassVar[int | None] = None
    #: Seconds an attempt may run (None: no limit). Past it, an async listener is
    #: cancelled and a sync one is told (``durable.cancellation()``); the attempt then
    #: fails as an AttemptTimeout, its writes undone, and is retried or dead.
    timeout: ClassVar[float | None] = None
    #: At most N messages of the channel started per period, across every worker and
    #: machine (None: no limit): ``"100/s"``, ``"10/m"``, ``(100, timedelta(minutes=1))``.
    #: Enforced in the database by a token bucket (see :func:`rate_of`).
    rate_limit: ClassVar[str | tuple[int, datetime.timedelta] | None] = None
    #: At most N messages of one ``limit_key`` (``notify(..., limit_key="customer-7")``)
    #: started per period, across every worker and machine (None: no limit); the forms
    #: of ``rate_limit``, a token bucket per key (see :func:`key_rate_of`). Messages
    #: without a limit_key are not key-limited; an exhausted key holds back only its
    #: own messages. Both limits hold together.
    key_rate_limit: ClassVar[str | tuple[int, datetime.timedelta] | None] = None
    #: At most M messages of one ``limit_key`` in listeners at once, across every
    #: worker (None: no limit), held as leases like ``max_in_flight`` slots; no order
    #: promise. A message with an ordering_key too waits for both: its key's turn (one
    #: at a time, in order) and a slot of its limit_key.
    key_concurrency: ClassVar[int | None] = None
    #: A cron expression (5 fields, or 6 with seconds last): one message per tick, at or
    #: after the tick's instant, never twice. When the clocks change, a wall-clock time
    #: that does not exist (spring forward) runs at the first instant after the gap; one
    #: that occurs twice (fall back) runs once, at its first occurrence, unless the minute
    #: or hour field starts with ``*`` (``0 * * * *``: every real hour), which runs at
    #: both. An expression that is invalid or never matches (``0 0 31 2 *``) is a
    #: ConfigurationError at declaration.
    schedule: ClassVar[str | None] = None
    #: The time zone of ``schedule`` (an IANA name such as ``Europe/Berlin``; an unknown
    #: one is a ConfigurationError at declaration).
    timezone: ClassVar[str] = "UTC"
    #: Keep each message's outcome (durable channels): its listener's return value
    #: (JSON, typed by the class attribute ``Result`` when set) or its final error,
    #: for ``retention`` seconds (a day, :data:`RESULT_RETENTION`, when that is 0),
    #: for ``handle.result()`` to return (see :mod:`pgpubsub._results`).
    results: ClassVar[bool] = False
    _pgpubsub_options: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **options: Any) -> None:
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise ConfigurationError(f"unknown channel option(s) {sorted(unknown)} on {cls}")
        super().__init_subclass__()
        cls._pgpubsub_options = options
        for key in _SETTINGS:
            if key in options:
                setattr(cls, key, options[key])
        _check_settings(cls, f"{cls.__module__}.{cls.__qualname__}")


#: Seconds a results channel keeps its outcomes when its ``retention`` is 0: a day.
RESULT_RETENTION = 86400.0


def kept_for(cls: type[Any]) -> float:
    """Seconds a completed message of the channel is kept: ``retention``, or a day for results."""
    retention = float(cls.retention)
    return retention or (RESULT_RETENTION if cls.results else 0.0)


#: The largest count option (attempts, slots): PostgreSQL's integer.
#: The most processors per channel in one worker (a thread and a connection each).
MAX_CONCURRENCY = 256
#: The largest max_in_flight (a lease row per slot in use; finding a free one reads them).
MAX_IN_FLIGHT = 10_000
_MAX_COUNT = 2**31 - 1
#: The longest duration option (seconds): a century, as ``delay``.
_MAX_SECONDS = 100 * 365.25 * 86400
#: The longest timeout (seconds): a day.
MAX_TIMEOUT = 86400.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_settings(cls: type[Channel], path: str) -> None:
    """Each option's type and range, so that a bad value fails where it is written.

    (``schedule`` and ``timezone`` are checked with the channel's spec.)
    """

    def bad(name: str, what: str) -> ConfigurationError:
        return ConfigurationError(f"{path}: {name} must be {what}, not {getattr(cls, name)!r}")

    if not isinstance(cls.lock_notifications, bool):
        raise bad("lock_notifications", "True or False")
    if not isinstance(cls.results, bool):
        raise bad("results", "True or False")
    result_type = getattr(cls, "Result", None)
    if result_type is not None:
        try:  # a type msgspec cannot decode would fail every message after its listener ran
            msgspec.json.Decoder(result_type)
        except (TypeError, ValueError) as exc:
            raise bad("Result", f"a type msgspec can decode ({exc})") from exc
    if not _is_int(cls.max_attempts) or not 1 <= cls.max_attempts <= _MAX_COUNT:
        raise bad("max_attempts", f"an int from 1 to {_MAX_COUNT}")
    for name in ("retry_delay", "retry_max_delay", "retention"):
        value = getattr(cls, name)
        if not (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and 0 <= value <= _MAX_SECONDS
        ):
            raise bad(name, f"seconds (an int or a float) from 0 to {_MAX_SECONDS:g} (a century)")
    if cls.retry_max_delay < cls.retry_delay:  # the cap would silently win
        raise ConfigurationError(
            f"{path}: retry_max_delay ({cls.retry_max_delay!r}) is under retry_delay "
            f"({cls.retry_delay!r}): retries wait from retry_delay up to retry_max_delay"
        )
    if not _is_int(cls.concurrency) or not 1 <= cls.concurrency <= MAX_CONCURRENCY:
        raise bad("concurrency", f"an int from 1 to {MAX_CONCURRENCY}")
    limit = cls.max_in_flight
    if limit is not None and (not _is_int(limit) or not 1 <= limit <= MAX_IN_FLIGHT):
        raise bad("max_in_flight", f"None or an int from 1 to {MAX_IN_FLIGHT}")
    slots = cls.key_concurrency
    if slots is not None and (not _is_int(slots) or not 1 <= slots <= MAX_IN_FLIGHT):
        raise bad("key_concurrency", f"None or an int from 1 to {MAX_IN_FLIGHT}")
    timeout = cls.timeout
    if timeout is not None and not (
        isinstance(timeout, (int, float))
        and not isinstance(timeout, bool)
        and math.isfinite(timeout)
        and 0 < timeout <= MAX_TIMEOUT
    ):
        raise bad("timeout", f"None or seconds (an int or a float) over 0, up to {MAX_TIMEOUT:g}")
    for name in ("rate_limit", "key_rate_limit"):
        if getattr(cls, name) is not None and _parse_rate(getattr(cls, name)) is None:
            raise bad(
                name,
                f"None, 'N/unit' (unit s, m, h or d) or (N, timedelta), N from 1 to {MAX_RATE:,}"
                ", the period from 1 ms to a day",
            )


#: The most messages a rate_limit lets start in one period.
MAX_RATE = 1_000_000
_UNITS = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hour": 3600.0,
    "d": 86400.0, "day": 86400.0,
}  # fmt: skip


def _parse_rate(value: Any) -> tuple[int, float] | None:
    """``(N, period in seconds)`` of a ``rate_limit`` value, or None if it is not one."""
    if isinstance(value, str):
        count, _, unit = value.partition("/")
        count, unit = count.strip(), unit.strip().lower()
        if not count.isdigit() or unit not in _UNITS:
            return None
        n, period = int(count), _UNITS[unit]
    elif isinstance(value, tuple) and len(value) == 2:
        n, span = value
        if not _is_int(n) or not isinstance(span, datetime.timedelta):
            return None
        period = span.total_seconds()
    else:
        return None
    if not (1 <= n <= MAX_RATE and 0.001 <= period <= 86400.0):
        return None
    return n, period


@dataclass(frozen=True)
class Rate:
    """A channel's rate limit: ``count`` messages started per ``period`` seconds.

    Enforced as a token bucket in the database (``pgpubsub.rate_bucket``):
    tokens come at ``count / period`` a second, up to :attr:`capacity`, and each
    message claimed takes one. The capacity is a tenth of a period's count (at
    least 1): a burst is at most that, so claims are smooth rather than bunched
    at period edges, and any window of one period has at most ``count +
    capacity`` claims (a sliding window of exactly ``count`` would need a row
    per claim). A batch's messages start one after another once claimed; on a
    limit of at most 10 a second, one that could not start within half a token's
    interval after the batch's first goes back, its token spent, so that starts
    keep the rate as claims do (a faster limit's window of starts may also hold a
    few claimed just before it).
    """

    count: int
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period

    @property
    def capacity(self) -> int:
        return max(1, math.ceil(self.count / 10))


def rate_of(cls: type[Any], option: str = "rate_limit") -> Rate | None:
    """The :class:`Rate` of a channel class's ``rate_limit`` (None: no limit)."""
    value = getattr(cls, option, None)
    parsed = None if value is None else _parse_rate(value)
    return None if parsed is None else Rate(*parsed)


def key_rate_of(cls: type[Any]) -> Rate | None:
    """The :class:`Rate` of a channel class's ``key_rate_limit``, per limit_key (None: none).

    The same token bucket as a channel's :class:`Rate`, one per (channel,
    limit_key) in ``pgpubsub.key_bucket``: smooth (a burst of at most its
    capacity, a tenth of a period's count), spent in the claim transaction, so
    the limit holds across every worker. A bucket row of a key that refilled
    to its capacity is the same as none: such rows are deleted (the table holds
    the keys active within about a period).
    """
    return rate_of(cls, "key_rate_limit")


@dataclass
class TriggerChannel(Channel):
    """Row events of one table, sent by triggers (:mod:`pgpubsub.triggers`).

    Bind it to a table with the class keyword ``table="schema.name"`` (or a
    ``(schema, name)`` tuple), or, under Django, with ``model = MyModel``::

        @dataclass
        class OrderEvents(TriggerChannel, table="shop.orders"):
            pass

    A listener takes any of the event's fields: ``old`` and ``new`` (the row
    before and after: a dict of columns, or an unsaved model instance when
    ``model`` is set; None for the side that does not exist), ``operation``
    (``INSERT``, ``UPDATE`` or ``DELETE``), ``when`` (``BEFORE`` or ``AFTER``),
    ``table`` (``schema.name``) and ``context`` (see
    :func:`pgpubsub.triggers.set_notification_context`).
    """

    old: Any = None
    new: Any = None
    operation: str = ""
    when: str = ""
    table: str = ""
    context: dict[str, Any] | None = None

    #: The Django model whose table the channel watches (django-pgpubsub's spelling).
    model: ClassVar[Any] = None

    def __post_init__(self) -> None:
        model = type(self).model
        if model is not None:
            from ._djangorows import instance_from_row

            self.old = instance_from_row(model, self.old)
            self.new = instance_from_row(model, self.new)


@dataclass(frozen=True)
class ChannelSpec:
    """Everything the library derives from a channel class, computed once."""

    cls: type[Channel]
    name: str  # the PostgreSQL channel name
    path: str  # module.QualName
    fields: tuple[str, ...]
    lock: bool
    encoder: msgspec.json.Encoder
    decoder: Any  # msgspec.json.Decoder, or _Widened
    template: dict[str, Any] = field(compare=False)  # field -> default, in field order
    required: frozenset[str] = field(compare=False)

    def encode_lines(self, messages: Iterable[Any]) -> tuple[str, int]:
        """JSON payloads of channel instances or dicts of fields, one per line, and their count.

        Encoded in one call; encoded JSON never holds a raw newline, so the
        lines are the messages.
        A dict gets the defaults of the fields it leaves out; a key that is not
        a field, or a missing required field, is a SchemaMismatch. Values are
        not checked against their types here: listeners decode with the schema.
        """
        cls, template, fields, required = (
            self.cls,
            self.template,
            self.template.keys(),
            self.required,
        )
        items: list[Any] = []
        for m in messages:
            if isinstance(m, dict):
                keys = m.keys()
                if keys == fields:  # every field given: nothing to fill in
                    items.append(m)
                    continue
                if not (keys <= fields and required <= keys):
                    raise SchemaMismatch(self._misfit(m))
                filled = template.copy()
                filled.update(m)
                items.append(filled)
            elif isinstance(m, cls):
                items.append(m)
            else:
                raise ConfigurationError(f"{m!r} is not a {self.path} or a dict of its fields")
        try:
            return self.encoder.encode_lines(items)[:-1].decode(), len(items)
        except (TypeError, ValueError) as exc:  # an unencodable value, a lone surrogate
            raise SchemaMismatch(f"{self.path}: a field value cannot be sent: {exc}") from exc

    def decode(self, payload: str | bytes) -> Any:
        try:
            return self.decoder.decode(payload)
        except msgspec.ValidationError as exc:
            raise SchemaMismatch(
                f"payload does not match {self.path}: {exc} (payload {_shown(payload)})"
            ) from exc
        except msgspec.DecodeError as exc:
            raise SchemaMismatch(
                f"payload on {self.path} is not valid JSON: {exc} (payload {_shown(payload)})"
            ) from exc

    def _misfit(self, fields: dict[str, Any]) -> str:
        unknown = sorted(fields.keys() - self.template.keys())
        missing = sorted(self.required - fields.keys())
        parts = [f"no field(s) {unknown}"] * bool(unknown) + [f"missing {missing}"] * bool(missing)
        return f"{self.path}: {', '.join(parts)}"


_SHOWN_CHARS = 200


def _shown(payload: str | bytes) -> str:
    """The payload for an error message: its first characters, and its size when cut."""
    text = payload if isinstance(payload, str) else payload.decode(errors="replace")
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS]!r}... ({len(text)} characters)"


class _Widened:
    """Decodes a channel whose fields default to None without admitting it in their type.

    ``date: datetime.date = None`` (django-pgpubsub's own spelling) means "may
    be None": the payload is decoded into a struct whose such fields are
    ``T | None``, then the channel is made from it (its ``__post_init__`` runs once).
    """

    def __init__(self, cls: type[Any], widened: set[str], hints: dict[str, Any]) -> None:
        fields = [f for f in dataclasses.fields(cls) if f.init]
        spec: list[tuple[str, Any, Any]] = []
        for f in fields:
            kind = hints[f.name] | None if f.name in widened else hints[f.name]
            if f.default is not dataclasses.MISSING:
                spec.append((f.name, kind, f.default))
            elif f.default_factory is not dataclasses.MISSING:
                spec.append((f.name, kind, msgspec.field(default_factory=f.default_factory)))
            else:
                spec.append((f.name, kind, msgspec.NODEFAULT))
        struct = msgspec.defstruct(cls.__name__, spec, kw_only=True)
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(type=struct)
        self._cls = cls
        self._names = tuple(f.name for f in fields)

    def decode(self, payload: str | bytes) -> Any:
        struct = self._decoder.decode(payload)
        return self._cls(**{name: getattr(struct, name) for name in self._names})


def _decoder(cls: type[Any]) -> Any:
    """A JSON decoder of ``cls``: msgspec's, unless a field defaults to None outside its type."""
    none_defaults = [f for f in dataclasses.fields(cls) if f.default is None and f.init]
    hints = typing.get_type_hints(cls) if none_defaults else {}
    widened = set()
    for f in none_defaults:
        if f.name in hints:
            try:
                msgspec.convert(None, type=hints[f.name])
            except msgspec.ValidationError:
                widened.add(f.name)
    if widened:
        return _Widened(cls, widened, hints)
    return msgspec.json.Decoder(type=cls)


def _template(cls: type[Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """Field order with defaults (None for required fields), and the required fields."""
    template: dict[str, Any] = {}
    required = set()
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            template[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            template[f.name] = f.default_factory()
        else:
            template[f.name] = None
            required.add(f.name)
    return template, frozenset(required)


_specs: dict[type[Any], ChannelSpec] = {}


def _default_name(path: str) -> str:
    if len(path.encode()) <= MAX_NAME_BYTES:
        return path
    digest = hashlib.blake2b(path.encode(), digest_size=8).hexdigest()
    tail = path.encode()[-(MAX_NAME_BYTES - len(digest) - 2) :].decode(errors="ignore")
    return f"{tail}~{digest}"


def _check_queue_options(cls: type[Channel], path: str, required: frozenset[str]) -> None:
    """The durable-only options: sound values, on a durable channel."""
    _check_settings(cls, path)  # again: a class attribute may have changed since
    if cls.schedule is not None:
        check_schedule(cls.schedule, cls.timezone, path)
        if required:
            raise ConfigurationError(
                f"{path}: a scheduled channel's fields need defaults ({sorted(required)} have none)"
            )
    asked = [
        k
        for k in (
            "concurrency",
            "max_in_flight",
            "timeout",
            "rate_limit",
            "key_rate_limit",
            "key_concurrency",
            "schedule",
            "results",
        )
        if k in vars(cls) or k in cls._pgpubsub_options
    ]
    if asked and not cls.lock_notifications:
        raise ConfigurationError(f"{path}: {', '.join(asked)} need lock_notifications=True")


def spec_of(cls: type[Any]) -> ChannelSpec:
    """The :class:`ChannelSpec` of a channel class (validated on first use)."""
    spec = _specs.get(cls)
    if spec is not None:
        return spec
    if not (isinstance(cls, type) and issubclass(cls, Channel)):
        where = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)
        raise ConfigurationError(f"{where} is not a Channel subclass")
    if not dataclasses.is_dataclass(cls):
        raise ConfigurationError(f"{cls.__qualname__} must be declared with @dataclass")
    path = f"{cls.__module__}.{cls.__qualname__}"
    name = validate_channel(cls._pgpubsub_options.get("name") or _default_name(path))
    try:
        decoder = _decoder(cls)
    except (TypeError, NameError) as exc:
        raise ConfigurationError(
            f"channel {path} has a field type msgspec cannot use: {exc}"
        ) from exc
    template, required = _template(cls)
    _check_queue_options(cls, path, required)
    spec = ChannelSpec(
        cls=cls,
        template=template,
        required=required,
        name=name,
        path=path,
        fields=tuple(template),
        lock=bool(cls.lock_notifications),
        encoder=msgspec.json.Encoder(),
        decoder=decoder,
    )
    _specs[cls] = spec
    return spec


def resolve_channel(channel: type[Any] | str) -> ChannelSpec:
    """The spec of a channel class or of a dotted path ``module.Class``."""
    if isinstance(channel, str):
        module_name, _, attr = channel.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ChannelNotFound(f"no channel at {channel!r}: {exc}") from exc
        return spec_of(obj)
    return spec_of(channel)
