"""Local time: a user's time zone, weekday and clock specs, the next matching local time
and send windows, all of them correct across DST changes (:mod:`zoneinfo`).

Every instant here is naive UTC, as the clock and the store keep them; local times exist
only inside these functions. Two DST rules apply throughout, the same as for SMS quiet
hours (:func:`segflowd.delivery.sms.quiet_until`):

* a wall time the spring-forward gap skips is read with the offset in force before the
  change, so 02:30 on the night New York goes from 02:00 to 03:00 is 03:30 EDT;
* a wall time the fall-back hour shows twice is its first occurrence, or the second when
  the first has already passed.

A user's zone is their ``timezone`` attribute (an IANA name), else the configured
default (``[daemon] default_timezone``); an attribute that names no zone falls back to
the default, and :func:`user_zone` says so, for the caller to count.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import re
import zoneinfo
from collections.abc import Mapping

from .metrics import Metrics

__all__ = ["ALL_DAYS", "FALLBACKS", "WEEKDAYS", "Window", "check_local_wait", "count_fallback",
           "default_zone", "find_zone", "next_local", "parse_clock", "parse_weekdays",
           "parse_window", "user_zone", "zone"]

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = date.weekday()
ALL_DAYS = frozenset(range(7))
SEARCH_DAYS = 9  # days: a weekly match is at most 7 days ahead, plus a DST night's margin
FALLBACKS = "segflow_timezone_fallbacks_total"  # counter: unknown ``timezone`` attributes met
_CLOCK = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*$")


@functools.lru_cache(maxsize=512)
def find_zone(name: str) -> zoneinfo.ZoneInfo | None:
    """The IANA zone ``name``, or None when there is none by that name."""
    if not name or name != name.strip():
        return None
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return None


def zone(name: object) -> zoneinfo.ZoneInfo:
    """The IANA zone ``name``; ValueError saying what was given when there is none."""
    found = find_zone(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as "
                         "'Europe/Paris' or 'America/New_York'")
    return found


def user_zone(attributes: Mapping[str, object], default: dt.tzinfo
              ) -> tuple[dt.tzinfo, bool]:
    """The zone of a user with these attributes, and whether it fell back to ``default``
    because their ``timezone`` attribute names no zone (an absent or empty attribute is
    not a fallback: the default is their zone)."""
    tz = attributes.get("timezone")
    if tz is None or tz == "":
        return default, False
    found = find_zone(tz) if isinstance(tz, str) else None
    return (found, False) if found is not None else (default, True)


def default_zone(name: str) -> dt.tzinfo:
    """``[daemon] default_timezone`` as a zone (config checked it; UTC should it not be)."""
    return find_zone(name) or dt.UTC


def count_fallback(metrics: Metrics, where: str) -> None:
    """Count one use of the default zone for a user whose ``timezone`` names none."""
    metrics.describe(FALLBACKS, "counter", "users whose timezone attribute names no IANA "
                     "zone, given the default zone instead, by what needed their zone")
    metrics.inc(FALLBACKS, where=where)


def parse_clock(text: object) -> dt.time:
    """``"09:00"`` → 09:00; ValueError when it is not a 24-hour ``HH:MM``."""
    m = _CLOCK.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f'a time of day must be "HH:MM" (e.g. "09:00"), not {text!r}')
    try:
        return dt.time(int(m.group(1)), int(m.group(2)))
    except ValueError:
        raise ValueError(f"{text!r} is not a time of day (00:00 to 23:59)") from None


def parse_weekdays(spec: object) -> frozenset[int]:
    """``"mon-fri"``, ``"sat,sun"``, ``"mon-wed,fri"`` or ``"fri-mon"`` (a range may wrap
    the week) as weekday numbers (Monday 0); None means every day. ValueError when a part
    names no day or the spec is empty."""
    if spec is None:
        return ALL_DAYS
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f'weekdays must be a string like "mon-fri" or "sat,sun", not {spec!r}')
    days: set[int] = set()
    for part in spec.lower().split(","):
        ends = [e.strip() for e in part.split("-")]
        if len(ends) > 2 or not all(e in WEEKDAYS for e in ends):
            raise ValueError(f"weekdays {spec!r}: {part.strip()!r} is not a day or a range of "
                             f"days (days: {', '.join(WEEKDAYS)})")
        first, last = WEEKDAYS.index(ends[0]), WEEKDAYS.index(ends[-1])
        days.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset(days)


def check_local_wait(hour: object, minute: object, weekdays: object, timezone: object
                     ) -> tuple[dt.time, frozenset[int], zoneinfo.ZoneInfo | None]:
    """The arguments of ``rt.wait_until_local`` as a time, days and an explicit zone (None:
    the user's); ValueError naming the first that is wrong."""
    clock: list[int] = []
    for what, value, top in (("hour", hour, 23), ("minute", minute, 59)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            raise ValueError(f"{what} must be a whole number from 0 to {top}, not {value!r}")
        clock.append(value)
    days = parse_weekdays(weekdays)
    tz = None if timezone is None else zone(timezone)
    return dt.time(clock[0], clock[1]), days, tz


def _occurrences(day: dt.date, at: dt.time, tz: dt.tzinfo) -> list[dt.datetime]:
    """The instants (naive UTC) at which the wall clock of ``tz`` shows ``at`` on ``day``:
    one, two on a fall-back night, or, in a spring-forward gap, the one the offset
    before the change gives."""
    first = dt.datetime.combine(day, at, tzinfo=tz)
    as_utc = first.astimezone(dt.UTC)
    if as_utc.astimezone(tz).replace(tzinfo=None) != first.replace(tzinfo=None):
        return [as_utc.replace(tzinfo=None)]  # in the gap: fold=1 would go back in time
    second = first.replace(fold=1).astimezone(dt.UTC)
    out = [as_utc.replace(tzinfo=None)]
    if second != as_utc:
        out.append(second.replace(tzinfo=None))
    return out


def next_local(now: dt.datetime, tz: dt.tzinfo, at: dt.time,
               days: frozenset[int] = ALL_DAYS) -> dt.datetime:
    """The first instant strictly after ``now`` (naive UTC) at which ``tz``'s wall clock
    shows ``at`` on one of ``days``, as naive UTC. Strictly: a flow that waits for 09:00
    at 09:00 waits for the next one, so a loop cannot match the same moment twice."""
    if not days:
        raise ValueError("no weekday to match")
    local_day = now.replace(tzinfo=dt.UTC).astimezone(tz).date()
    for i in range(SEARCH_DAYS):
        day = local_day + dt.timedelta(days=i)
        if day.weekday() not in days:
            continue
        for instant in _occurrences(day, at, tz):
            if instant > now:
                return instant
    raise AssertionError("unreachable: every week has a matching day")  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class Window:
    """A daily window of local time, ``start`` to ``end`` on ``days``; it may wrap
    midnight (22:00 to 02:00: open from 22:00 on one of ``days`` until 02:00 the day
    after). ``text`` is how it was written, for messages."""

    start: dt.time
    end: dt.time
    days: frozenset[int]
    text: str

    def is_open(self, now: dt.datetime, tz: dt.tzinfo) -> bool:
        """Whether ``tz``'s wall clock is inside the window at ``now`` (naive UTC)."""
        local = now.replace(tzinfo=dt.UTC).astimezone(tz)
        t, wd = local.time().replace(tzinfo=None), local.weekday()
        if self.start < self.end:
            return wd in self.days and self.start <= t < self.end
        return (wd in self.days and t >= self.start) or (
            (wd - 1) % 7 in self.days and t < self.end)

    def opens(self, now: dt.datetime, tz: dt.tzinfo) -> dt.datetime | None:
        """None when the window is open at ``now`` (naive UTC); else when it next opens,
        in naive UTC. At that instant :meth:`is_open` holds (a start in a DST gap opens
        when the clock jumps past it)."""
        if self.is_open(now, tz):
            return None
        return next_local(now, tz, self.start, self.days)

    def closes(self, now: dt.datetime, tz: dt.tzinfo) -> dt.datetime | None:
        """None when the window is closed at ``now`` (naive UTC); else when it closes, in
        naive UTC (an end in a DST gap is read with the offset before the change, as
        every wall time here)."""
        if not self.is_open(now, tz):
            return None
        wraps = self.end < self.start  # then it closes the day after it opened
        days = frozenset((d + 1) % 7 for d in self.days) if wraps else self.days
        return next_local(now, tz, self.end, days)


def parse_window(value: object) -> Window:
    """``("09:00", "18:00")`` or ``("09:00", "18:00", "mon-fri")`` as a :class:`Window`;
    ValueError saying what is wrong (not a pair or triple, a bad time, bad days, an empty
    window)."""
    if isinstance(value, str) or not isinstance(value, tuple | list) or len(value) not in (
            2, 3):
        raise ValueError('a send window is ("HH:MM", "HH:MM") or ("HH:MM", "HH:MM", '
                         f'"mon-fri"), not {value!r}')
    start, end = parse_clock(value[0]), parse_clock(value[1])
    if start == end:
        raise ValueError(f"window {value[0]}-{value[1]} is empty: start and end are the same")
    days = parse_weekdays(value[2] if len(value) == 3 else None)
    text = f"{start:%H:%M}-{end:%H:%M} {value[2] if len(value) == 3 else 'every day'}"
    return Window(start, end, days, text)
