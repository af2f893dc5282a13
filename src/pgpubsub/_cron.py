"""Cron schedules in a time zone, as UTC instants (croniter, ``pgpubsub[schedule]``).

A schedule's ticks are the wall-clock times of its zone that match the
expression, each placed at an instant:

- a time that exists once runs at that instant;
- a time that does not exist (skipped when the clocks go forward) runs at the
  first instant after the gap, once however many skipped times match
  (``30 2 * * *`` in Europe/Berlin runs at 03:00 CEST that day);
- a time that exists twice (repeated when the clocks go back) runs once, at
  its first occurrence, unless the expression keeps real time: when its
  minute or hour field starts with ``*`` (``0 * * * *``, ``*/15 * * * *``)
  it runs at both occurrences, so that hourly is every real hour.

This is what cron does (Vixie cron's "wildcard" and "fixed-time" jobs): a
daily job runs once per local day, an hourly job every hour that passes.

Every computation is on UTC instants: wall-clock datetimes of one zone are
never subtracted or compared (Python ignores the UTC offset when both sides
share a tzinfo). Walks go over croniter's naive wall-clock times, and cost a
number of croniter steps bounded by the ticks asked for, plus the times of the
one repeated hour next to the start.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

from .errors import ConfigurationError

__all__ = ["UTC", "Cron", "check", "croniter", "zone"]

UTC = datetime.timezone.utc
_SECOND = datetime.timedelta(seconds=1)
_DAY = datetime.timedelta(days=1)


def croniter() -> Any:
    try:
        from croniter import croniter as cls
    except ImportError:
        raise ConfigurationError(
            "scheduled channels need croniter: pip install 'pgpubsub[schedule]'"
        ) from None
    return cls


def zone(name: Any, path: str) -> datetime.tzinfo:
    """The IANA time zone ``name``; a ConfigurationError naming the channel's ``timezone``."""
    import zoneinfo

    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{path}: unknown timezone {name!r}: not an IANA time zone name")
    try:
        return zoneinfo.ZoneInfo(name)
    # OSError: a directory of the database ("Europe") or an unreadable file.
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError, OSError) as exc:
        raise ConfigurationError(
            f"{path}: unknown timezone {name!r}: not an IANA time zone name such as 'Europe/Berlin'"
        ) from exc


def check(expression: Any, timezone: Any, path: str) -> None:
    """A ConfigurationError naming the channel and the option when its schedule cannot work:
    not a 5- or 6-field cron expression, a schedule with no tick ever (``0 0 31 2 *``),
    or an unknown time zone."""
    cls = croniter()
    if not isinstance(expression, str) or not cls.is_valid(expression):
        raise ConfigurationError(f"{path}: schedule {expression!r} is not a cron expression")
    fields = cls(expression, datetime.datetime(2000, 1, 1)).expressions
    if len(fields) not in (5, 6):
        raise ConfigurationError(
            f"{path}: schedule {expression!r} has {len(fields)} fields; "
            "cron expressions have 5, or 6 with seconds last"
        )
    cron = Cron(expression, zone(timezone, path))
    try:
        cron.next_after(datetime.datetime.now(UTC))
    except Exception as exc:  # croniter's CroniterBadDateError: no such date, ever
        raise ConfigurationError(
            f"{path}: schedule {expression!r} never matches a date ({exc})"
        ) from exc


def _wall(instant: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
    """The naive wall-clock time of ``instant`` in ``tz``."""
    return instant.astimezone(tz).replace(tzinfo=None, fold=0)


class Cron:
    """The ticks of ``expression`` in ``tz``, as aware UTC datetimes (see the module)."""

    def __init__(self, expression: str, tz: datetime.tzinfo):
        self._croniter = croniter()
        self.expression = expression
        self.zone = tz
        minute, hour = self._croniter(expression, datetime.datetime(2000, 1, 1)).expressions[:2]
        #: Runs at both occurrences of a repeated time (minute or hour field ``*``...).
        self.real_time = minute.startswith("*") or hour.startswith("*")

    def _walk(self, start: datetime.datetime, backwards: bool = False) -> Iterator[Any]:
        """Matching naive wall-clock times strictly after (before) ``start``."""
        it = self._croniter(self.expression, start)
        step = it.get_prev if backwards else it.get_next
        while True:
            yield step(datetime.datetime)

    def _offset(self, instant: datetime.datetime) -> datetime.timedelta:
        offset = instant.astimezone(self.zone).utcoffset()
        assert offset is not None
        return offset

    def _transition(self, before: datetime.datetime, after: datetime.datetime) -> Any:
        """The first whole second at or after which the offset is ``after``'s (there is one
        change between ``before`` and ``after``)."""
        old = self._offset(before)
        lo, hi = int(before.timestamp()), int(after.timestamp()) + 1
        while hi - lo > 1:  # offset(lo) == old != offset(hi)
            mid = (lo + hi) // 2
            if self._offset(datetime.datetime.fromtimestamp(mid, UTC)) == old:
                lo = mid
            else:
                hi = mid
        return datetime.datetime.fromtimestamp(hi, UTC)

    def instants(self, wall: datetime.datetime) -> tuple[tuple[datetime.datetime, ...], bool]:
        """The tick instants of the wall-clock time ``wall``, earliest first, and whether the
        time is repeated (its first instant then precedes the clocks going back)."""
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if first == second:
            return (first,), False
        early, late = min(first, second), max(first, second)
        if _wall(early, self.zone) == wall and _wall(late, self.zone) == wall:  # repeated
            return ((early, late) if self.real_time else (early,)), True
        return (self._transition(early, late),), False  # skipped: the end of the gap

    def next_after(self, instant: datetime.datetime) -> datetime.datetime:
        """The first tick strictly after ``instant`` (an aware datetime)."""
        instant = instant.astimezone(UTC)
        local = instant.astimezone(self.zone)
        start = local.replace(tzinfo=None, fold=0)
        offset, later = local.utcoffset(), self._offset(instant + _DAY)
        assert offset is not None
        if later < offset:  # clocks go back within a day: its repeated times may lie behind
            start = min(start, _wall(self._transition(instant, instant + _DAY), self.zone))
            start -= _SECOND
        best: datetime.datetime | None = None
        # Walking forward, the first occurrences are in order; the second occurrences of a
        # repeated hour come after its first ones and before the first time after it.
        for wall in self._walk(start):
            ticks, repeated = self.instants(wall)
            for tick in ticks:
                if tick > instant and (best is None or tick < best):
                    best = tick
            if best is not None and not repeated and ticks[0] >= best:
                return best
        raise AssertionError("unreachable")  # pragma: no cover

    def latest(
        self, after: datetime.datetime, until: datetime.datetime, count: int
    ) -> list[datetime.datetime]:
        """The last ``count`` ticks in ``(after, until]``, oldest first.

        Walks backwards from ``until``: its cost is ``count`` ticks (plus one
        repeated hour), not the number of ticks since ``after``.
        """
        after, until = after.astimezone(UTC), until.astimezone(UTC)
        start = _wall(until, self.zone)
        earlier = self._offset(until - _DAY)
        offset = self._offset(until)
        if earlier > offset:  # clocks went back within a day: times up to until + earlier
            start += earlier - offset
        found: set[datetime.datetime] = set()
        for wall in self._walk(start + _SECOND, backwards=True):
            ticks, repeated = self.instants(wall)
            found.update(t for t in ticks if after < t <= until)
            if repeated:
                continue  # the second occurrences of earlier times are later than ticks[0]
            # Every time before `wall` has its instants at or before ticks[0].
            if ticks[0] <= after or sum(t >= ticks[0] for t in found) >= count:
                break
        return sorted(found)[-count:] if count > 0 else []
