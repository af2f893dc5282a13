"""Cron schedules in a time zone, as UTC instants (croniter, ``pgpubsub-engine[schedule]``).

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
share a tzinfo). Walks go over croniter's naive wall-clock times: the next tick,
or the one before, costs a few croniter steps (and a binary search of the
change's second next to a clock change), whatever the schedule.
"""

from __future__ import annotations

import datetime
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
            "scheduled channels need croniter: pip install 'pgpubsub-engine[schedule]'"
        ) from None
    return cls


# Files of the zone database that are no place's zone: the host's own zone
# (workers on different hosts would disagree), placeholders, leap-second variants.
_NOT_ZONES = {"localtime", "Factory", "posixrules"}
_NOT_IN = ("right/", "posix/")


def zone(name: Any, path: str) -> datetime.tzinfo:
    """The IANA time zone ``name``; a ConfigurationError naming the channel's ``timezone``."""
    import zoneinfo

    if not isinstance(name, str) or not name or name in _NOT_ZONES or name.startswith(_NOT_IN):
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
    if "r" in expression.lower().replace("@hourly", "").replace("@yearly", ""):
        # croniter's R draws a random value at each computation: workers (and one
        # worker's successive ticks) would disagree on when a tick is.
        raise ConfigurationError(
            f"{path}: schedule {expression!r}: random fields (R) are not supported"
        )
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

    def _match(self, start: datetime.datetime, backwards: bool = False) -> Any:
        """The first matching naive wall-clock time strictly after (before) ``start``."""
        it = self._croniter(self.expression, start)
        return (it.get_prev if backwards else it.get_next)(datetime.datetime)

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

    def instants(self, wall: datetime.datetime) -> tuple[tuple[datetime.datetime, ...], str]:
        """The tick instants of the wall-clock time ``wall``, earliest first, and its kind:
        ``once``, ``repeated`` (the clocks went back over it) or ``skipped`` (forward)."""
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if first == second:
            return (first,), "once"
        early, late = min(first, second), max(first, second)
        if _wall(early, self.zone) == wall and _wall(late, self.zone) == wall:
            return ((early, late) if self.real_time else (early,)), "repeated"
        return (self._transition(early, late),), "skipped"  # the end of the gap

    def _repeated_hour(self, instant: datetime.datetime) -> tuple[Any, Any] | None:
        """The wall-clock range ``[A, B)`` repeated when the clocks go back, if ``instant``
        is in it or it begins within a day after ``instant``."""
        local = instant.astimezone(self.zone)
        offset = local.utcoffset()
        assert offset is not None
        if local.fold:  # the second occurrence: the change was within the last `back`
            before = local.replace(fold=0).utcoffset()
            assert before is not None
            back = before - offset
            change = self._transition(instant - back, instant)
        else:
            later = self._offset(instant + _DAY)
            if later >= offset:
                return None
            back = offset - later
            change = self._transition(instant, instant + _DAY)
        start = _wall(change, self.zone)
        return start, start + back

    def next_after(self, instant: datetime.datetime) -> datetime.datetime:
        """The first tick strictly after ``instant`` (an aware datetime).

        A few croniter steps: the next first occurrence (in wall-clock order), and
        when the schedule keeps real time, the next second occurrence of a repeated hour.
        """
        instant = instant.astimezone(UTC)
        local = instant.astimezone(self.zone)
        wall = local.replace(tzinfo=None, fold=0)
        repeated = self._repeated_hour(instant)
        # First occurrences are in wall-clock order; in the second occurrence of a repeated
        # hour, the first occurrences of its times are past: the next one is after it.
        after = repeated[1] - _SECOND if local.fold and repeated else wall
        ticks = [self.instants(self._match(after))[0][0]]
        if self.real_time and repeated is not None:
            start, end = repeated
            candidate = self._match(wall if local.fold else start - _SECOND)
            if candidate < end:  # its second occurrence, after `instant`
                ticks.append(self.instants(candidate)[0][-1])
        return min(t for t in ticks if t > instant)

    def _previous(self, bound: datetime.datetime) -> datetime.datetime:
        """The last tick strictly before ``bound`` (a UTC instant in whole seconds).

        A few croniter steps, mirroring :meth:`next_after`: the last first occurrence,
        and the second occurrence of a repeated time when it is later.
        """
        local = bound.astimezone(self.zone)
        wall = local.replace(tzinfo=None, fold=0)
        ticks: list[datetime.datetime] = []
        if local.fold:  # in the second occurrence of a repeated hour [start, end)
            repeated = self._repeated_hour(bound)
            assert repeated is not None
            start, end = repeated
            # Every first occurrence of the hour is past; those after it are to come.
            ticks.append(self.instants(self._match(end, backwards=True))[0][0])
            if self.real_time:
                candidate = self._match(wall, backwards=True)
                if candidate >= start:
                    ticks.append(self.instants(candidate)[0][-1])
        else:
            candidate = self._match(wall, backwards=True)
            found, kind = self.instants(candidate)
            if kind == "skipped" and found[0] >= bound:
                # `bound` is the end of the gap: the times skipped run at it, not before.
                gap_start = _wall(found[0] - _SECOND, self.zone) + _SECOND
                found, kind = self.instants(self._match(gap_start, backwards=True))
            ticks.extend(found)  # a repeated time's second occurrence is after its first
        return max(t for t in ticks if t < bound)

    def latest(
        self, after: datetime.datetime, until: datetime.datetime, count: int
    ) -> list[datetime.datetime]:
        """The last ``count`` ticks in ``(after, until]``, oldest first.

        Walks back from ``until``, a few croniter steps per tick: the cost is
        ``count`` ticks, not the number of ticks since ``after``.
        """
        after = after.astimezone(UTC)
        until = until.astimezone(UTC).replace(microsecond=0) + _SECOND  # ticks are whole seconds
        found: list[datetime.datetime] = []
        while len(found) < count:
            until = self._previous(until)
            if until <= after:
                break
            found.append(until)
        return found[::-1]
