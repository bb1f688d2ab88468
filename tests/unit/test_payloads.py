"""Shared validation of ingest payloads."""

from __future__ import annotations

import datetime as dt

import pytest

from segflowd.http import HTTPError
from segflowd.ingest.payloads import check_size, dedupe_key, opt_id, opt_time, require_name


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-01-01T12:00:00+02:00", dt.datetime(2026, 1, 1, 10, 0)),
    ("2026-01-01T12:00:00Z", dt.datetime(2026, 1, 1, 12, 0)),
    ("2026-01-01T12:00:00.250", dt.datetime(2026, 1, 1, 12, 0, 0, 250000)),
    (1767225600, dt.datetime(2026, 1, 1)),
    (1767225600000, dt.datetime(2026, 1, 1)),  # milliseconds
    (None, None),
])
def test_times_become_naive_utc(value: object, expected: dt.datetime | None) -> None:
    assert opt_time(value, "timestamp") == expected


@pytest.mark.parametrize("value", ["soon", True, [1], float("nan"), "0001-01-01T00:00:00"])
def test_bad_times_are_400_naming_the_field(value: object) -> None:
    with pytest.raises(HTTPError) as info:
        opt_time(value, "batch[3].timestamp")
    assert info.value.status == 400
    assert info.value.message.startswith("batch[3].timestamp: ")


def test_ids_accept_integers_and_refuse_long_or_odd_values() -> None:
    assert opt_id(42, "userId") == "42"
    assert opt_id("", "userId") is None
    for bad in ("x" * 192, {"a": 1}, True):
        with pytest.raises(HTTPError):
            opt_id(bad, "userId")


def test_names_are_required_strings() -> None:
    assert require_name("purchase", "name") == "purchase"
    with pytest.raises(HTTPError, match="is required"):
        require_name(None, "name")


def test_dedupe_keys_are_namespaced_per_api_and_user_and_fit_the_column() -> None:
    keys = {dedupe_key("n", "u1", "x", "id"), dedupe_key("s", "u1", "x", "id"),
            dedupe_key("n", "u2", "x", "id"), dedupe_key("n", "u1:x", "", "id")}
    assert len(keys) == 4
    assert dedupe_key("n", "u1", None, "id") is None
    long = dedupe_key("s", "u" * 191, "m" * 200, "messageId")
    assert long is not None
    assert len(long) <= 255
    assert long != dedupe_key("s", "u" * 191, "m" * 199 + "n", "messageId")


def test_size_over_the_limit_is_413() -> None:
    check_size({"a": "x" * 10}, 100, "body")
    with pytest.raises(HTTPError) as info:
        check_size({"a": "x" * 200}, 100, "batch[0]")
    assert info.value.status == 413
    assert info.value.message.startswith("batch[0]: ")
