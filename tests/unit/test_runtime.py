"""rt commands: what a flow yields, and the clear errors for misuse."""

from __future__ import annotations

import datetime as dt

import pytest

from segflowd.errors import FlowError
from segflowd.flows.runtime import Command, Runtime

rt = Runtime(lambda name: True)


def test_waits_are_absolute_seconds_and_timeouts_accept_intervals() -> None:
    assert rt.wait(days=1, hours=2) == Command("wait", None, {"seconds": 93600.0})
    assert rt.wait_for_event("purchase", timeout="2d").args == {"timeout": 172800.0}
    assert rt.wait_for_event("purchase", timeout=dt.timedelta(hours=1)).args == {
        "timeout": 3600.0}
    aware = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert rt.wait_until(aware).args == {"at": "2026-01-01T10:00:00"}


def test_the_args_hash_is_stable_and_tells_arguments_apart() -> None:
    assert rt.send_email("a", x=1).hash == rt.send_email("a", x=1).hash
    assert rt.send_email("a", x=1).hash != rt.send_email("a", x=2).hash
    assert rt.opened("a").hash != rt.clicked("a").hash


def test_misuse_is_a_flow_error_with_a_sentence() -> None:
    with pytest.raises(FlowError, match="positive duration"):
        rt.wait(seconds=-5)
    with pytest.raises(FlowError, match="JSON-able"):
        rt.send_email("welcome", when=object())
    with pytest.raises(FlowError, match="takes a datetime"):
        rt.wait_until("tomorrow")  # type: ignore[arg-type]


def test_cached_argument_hashes_tell_equal_but_differently_spelled_values_apart() -> None:
    """1, 1.0 and True are one dict key but three JSON spellings (and so 0.0 and -0.0)."""
    spellings = [1, 1.0, True, 0.0, -0.0, "1", None]
    first = [rt.send_email("a", x=v).hash for v in spellings]
    again = [rt.send_email("a", x=v).hash for v in spellings]  # now from the cache
    assert first == again
    assert len(set(first)) == len(spellings)
    nested = rt.send_email("a", x=[1, 2]).hash  # not cached: not a scalar
    assert nested == rt.send_email("a", x=[1, 2]).hash != rt.send_email("a", x=[1, 3]).hash


@pytest.mark.parametrize("call", [
    lambda rt: rt.wait(days=float("inf")),
    lambda rt: rt.wait(seconds=float("nan")),
    lambda rt: rt.wait(days=10**300),
    lambda rt: rt.wait(days=-1),
    lambda rt: rt.wait(days="soon"),
    lambda rt: rt.wait_until(dt.datetime.max),
    lambda rt: rt.wait_for_event("paid", timeout=dt.timedelta(days=999_999)),
])
def test_a_wait_no_store_can_hold_is_a_flow_error(call: object) -> None:
    """A wake time must fit every store's DATETIME: refused in the flow, naming the wait."""
    rt = Runtime(lambda _name: False)
    with pytest.raises(FlowError, match=r"wait|duration"):
        call(rt)  # type: ignore[operator]


def test_the_longest_wait_is_still_allowed() -> None:
    rt = Runtime(lambda _name: False)
    assert rt.wait(days=36_000).args["seconds"] == 36_000 * 86400.0
