"""segflowd.localtime: weekday, clock and window specs, a user's zone with its fallback,
and the next matching local time and window opening across DST changes."""

from __future__ import annotations

import datetime as dt

import pytest

from segflowd.localtime import (
    ALL_DAYS,
    check_local_wait,
    next_local,
    parse_clock,
    parse_weekdays,
    parse_window,
    user_zone,
    zone,
)

NY = zone("America/New_York")  # 2026: EST→EDT on Sun 8 March, EDT→EST on Sun 1 November
PARIS = zone("Europe/Paris")  # 2026: CET→CEST on Sun 29 March


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute)  # naive UTC, as the store keeps it


@pytest.mark.parametrize(("spec", "days"), [
    ("mon-fri", {0, 1, 2, 3, 4}),
    ("sat,sun", {5, 6}),
    ("Mon-Wed, fri", {0, 1, 2, 4}),
    ("fri-mon", {4, 5, 6, 0}),  # a range may wrap the week
    ("sun", {6}),
    (None, set(range(7))),
])
def test_weekday_specs(spec: str | None, days: set[int]) -> None:
    assert parse_weekdays(spec) == frozenset(days)


@pytest.mark.parametrize("spec", ["", "monday", "mon-", "mon-fri-sat", "mon,,fri", 5,
                                  "weekdays"])
def test_a_malformed_weekday_spec_is_refused_with_what_was_given(spec: object) -> None:
    with pytest.raises(ValueError, match="weekdays"):
        parse_weekdays(spec)


def test_clock_times() -> None:
    assert parse_clock("09:00") == dt.time(9, 0)
    assert parse_clock("7:05") == dt.time(7, 5)
    for bad in ("24:00", "09:60", "9", "09.00", "", None):
        with pytest.raises(ValueError, match="time of day"):
            parse_clock(bad)


def test_an_unknown_zone_name_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        zone("Mars/Olympus")
    with pytest.raises(ValueError, match="unknown time zone"):
        zone(" Europe/Paris")


def test_a_users_zone_falls_back_only_when_the_attribute_names_no_zone() -> None:
    assert user_zone({"timezone": "Europe/Paris"}, dt.UTC) == (PARIS, False)
    assert user_zone({}, NY) == (NY, False)  # no attribute: the default is their zone
    assert user_zone({"timezone": ""}, NY) == (NY, False)
    assert user_zone({"timezone": "Europe/Atlantis"}, NY) == (NY, True)
    assert user_zone({"timezone": 3}, dt.UTC) == (dt.UTC, True)


def test_wait_arguments_are_checked() -> None:
    assert check_local_wait(9, 30, "mon-fri", "Europe/Paris") == (
        dt.time(9, 30), frozenset(range(5)), PARIS)
    assert check_local_wait(0, 0, None, None) == (dt.time(0), ALL_DAYS, None)
    for args, what in [((24, 0, None, None), "hour"), ((9, -1, None, None), "minute"),
                       ((True, 0, None, None), "hour"), ((9.5, 0, None, None), "hour"),
                       ((9, 0, "someday", None), "weekdays"),
                       ((9, 0, None, "Nowhere/City"), "unknown time zone")]:
        with pytest.raises(ValueError, match=what):
            check_local_wait(*args)


def test_next_local_is_strictly_later_and_follows_the_zones_offset() -> None:
    # Friday 6 March 2026, 14:00 UTC = 09:00 EST: 09:00 itself is not "next".
    at_nine = utc(2026, 3, 6, 14)
    assert next_local(at_nine, NY, dt.time(9)) == utc(2026, 3, 7, 14)
    # mon-fri from that Friday: Monday 9 March, after the change, 09:00 EDT = 13:00 UTC.
    assert next_local(at_nine, NY, dt.time(9), parse_weekdays("mon-fri")) == utc(
        2026, 3, 9, 13)
    # Paris changes three weeks later: 09:00 CET = 08:00 UTC, then CEST = 07:00 UTC.
    assert next_local(utc(2026, 3, 27, 12), PARIS, dt.time(9)) == utc(2026, 3, 28, 8)
    assert next_local(utc(2026, 3, 28, 12), PARIS, dt.time(9)) == utc(2026, 3, 29, 7)


def test_a_time_in_the_spring_forward_gap_is_read_with_the_offset_before() -> None:
    # 02:30 does not exist in New York on 8 March 2026: 02:30 EST is 03:30 EDT, 07:30 UTC.
    assert next_local(utc(2026, 3, 8, 0), NY, dt.time(2, 30)) == utc(2026, 3, 8, 7, 30)


def test_a_time_shown_twice_at_fall_back_is_the_first_then_the_second() -> None:
    # 01:30 comes twice in New York on 1 November 2026: 05:30 UTC (EDT), 06:30 UTC (EST).
    assert next_local(utc(2026, 11, 1, 4), NY, dt.time(1, 30)) == utc(2026, 11, 1, 5, 30)
    assert next_local(utc(2026, 11, 1, 5, 30), NY, dt.time(1, 30)) == utc(2026, 11, 1, 6, 30)
    assert next_local(utc(2026, 11, 1, 6, 30), NY, dt.time(1, 30)) == utc(2026, 11, 2, 6, 30)


def test_a_window_opens_at_its_start_in_the_users_zone_across_dst() -> None:
    w = parse_window(("09:00", "18:00", "mon-fri"))
    assert w.text == "09:00-18:00 mon-fri"
    # Saturday 7 March 2026 noon in New York: closed until Monday 09:00 EDT.
    sat = utc(2026, 3, 7, 17)
    assert not w.is_open(sat, NY)
    assert w.opens(sat, NY) == utc(2026, 3, 9, 13)
    assert w.opens(utc(2026, 3, 9, 13), NY) is None  # open at its opening instant
    assert w.opens(utc(2026, 3, 9, 22), NY) == utc(2026, 3, 10, 13)  # 18:00 EDT: closed
    # The same instant in Paris is Saturday evening: Monday 09:00 CET = 08:00 UTC.
    assert w.opens(sat, PARIS) == utc(2026, 3, 9, 8)


def test_a_window_may_wrap_midnight_and_belongs_to_its_start_day() -> None:
    w = parse_window(("22:00", "02:00", "fri"))
    assert w.is_open(utc(2026, 3, 6, 23), dt.UTC)  # Friday 23:00
    assert w.is_open(utc(2026, 3, 7, 1), dt.UTC)  # Saturday 01:00: Friday's night
    assert not w.is_open(utc(2026, 3, 7, 23), dt.UTC)  # Saturday 23:00
    assert w.opens(utc(2026, 3, 7, 3), dt.UTC) == utc(2026, 3, 13, 22)


def test_a_window_starting_in_the_gap_opens_when_the_clock_jumps_past_it() -> None:
    w = parse_window(("02:30", "05:00"))
    opens = w.opens(utc(2026, 3, 8, 5), NY)  # 00:00 EST, the night of the change
    assert opens == utc(2026, 3, 8, 7, 30)  # 03:30 EDT
    assert opens is not None
    assert w.is_open(opens, NY)


@pytest.mark.parametrize(("value", "what"), [
    ("09:00-18:00", "a send window is"),
    (("09:00",), "a send window is"),
    (("09:00", "18:00", "mon-fri", "x"), "a send window is"),
    (("9am", "18:00"), "HH:MM"),
    (("09:00", "25:00"), "not a time of day"),
    (("09:00", "09:00"), "empty"),
    (("09:00", "18:00", "weekdays"), "weekdays"),
])
def test_a_malformed_window_says_what_is_wrong(value: object, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        parse_window(value)


def test_an_open_window_says_when_it_closes_across_fall_back() -> None:
    quiet = parse_window(("21:00", "08:00"))
    assert quiet.closes(utc(2026, 3, 6, 17), NY) is None  # 12:00 EST Friday: closed
    assert quiet.closes(utc(2026, 3, 7, 3), NY) == utc(2026, 3, 7, 13)  # 22:00 → 08:00 EST
    # Saturday night into Sunday 8 March: the window closes at 08:00 EDT, 12:00 UTC.
    assert quiet.closes(utc(2026, 3, 8, 3), NY) == utc(2026, 3, 8, 12)
    # 00:00-01:30 on 1 November: at 01:15 EST (the second 01:15) it closes at the second
    # 01:30, 06:30 UTC; at 01:15 EDT (the first), at the first 01:30, 05:30 UTC.
    night = parse_window(("00:00", "01:30"))
    assert night.closes(utc(2026, 11, 1, 6, 15), NY) == utc(2026, 11, 1, 6, 30)
    assert night.closes(utc(2026, 11, 1, 5, 15), NY) == utc(2026, 11, 1, 5, 30)
    friday_night = parse_window(("22:00", "02:00", "fri"))
    assert friday_night.closes(utc(2026, 3, 6, 23), dt.UTC) == utc(2026, 3, 7, 2)
