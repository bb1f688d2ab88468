"""Phone numbers: valid ones normalised to E.164, invalid ones kept with a clear reason."""

from __future__ import annotations

import pytest

from segflowd.phones import check_phone, phone_error, phone_of, region_error


@pytest.mark.parametrize(("value", "region", "e164"), [
    ("+14155550100", None, "+14155550100"),
    ("+1 (415) 555-0100", None, "+14155550100"),
    ("+44 20 7946 0958", None, "+442079460958"),
    ("+49 30 901820", None, "+4930901820"),
    ("020 7946 0958", "GB", "+442079460958"),
    ("(415) 555-0100", "US", "+14155550100"),
    ("(415) 555-0100", "us", "+14155550100"),
    ("+14155550100", "GB", "+14155550100"),  # a + number ignores the default region
    ("0044 20 7946 0958", "DE", "+442079460958"),  # the region's international prefix
])
def test_valid_numbers_are_normalised_to_e164(value: str, region: str | None,
                                               e164: str) -> None:
    assert check_phone(value, region) == (e164, None)


@pytest.mark.parametrize(("value", "region", "reason"), [
    ("4155550100", None, "has no country code"),
    ("+1 555 0100", None, "not a valid phone number"),  # too short for +1
    ("+1 415 555 01000", None, "not a valid phone number"),
    ("+999 1234567", None, "country code is unknown"),
    ("call me", "US", "not a number"),
    ("+14155550100 ext. 12", None, "extension"),
    ("+1415555\n0100", None, "control character"),
    ("", None, "empty"),
    ("4155550100", "XX", "'XX' is not a region"),
])
def test_invalid_numbers_are_kept_with_a_reason(value: str, region: str | None,
                                                reason: str) -> None:
    kept, why = check_phone(value, region)
    assert kept == value
    assert why is not None
    assert reason in why


def test_a_number_valid_in_one_region_can_be_invalid_in_another() -> None:
    assert check_phone("(415) 555-0100", "US")[1] is None
    assert check_phone("(415) 555-0100", "GB")[1] is not None


def test_check_phone_is_cached() -> None:
    check_phone.cache_clear()
    check_phone("+14155550100")
    check_phone("+14155550100")
    assert check_phone.cache_info().hits == 1


def test_region_error() -> None:
    assert region_error("US") is None
    assert region_error("gb") is None
    assert "not a region" in (region_error("EU") or "")


def test_phone_error_reads_the_phone_attribute() -> None:
    assert phone_error({}) is None
    assert phone_error({"phone": None}) is None
    assert phone_error({"phone": "  "}) is None
    assert phone_error({"phone": "+14155550100"}) is None
    assert phone_error({"phone": " +1 415 555 0100 "}) is None
    assert "must be a string" in (phone_error({"phone": 14155550100}) or "")
    assert "must be a string" in (phone_error({"phone": ["+14155550100"]}) or "")
    assert "not a valid phone number" in (phone_error({"phone": "+1 555"}) or "")
    assert "no country code" in (phone_error({"phone": "4155550100"}) or "")
    assert phone_error({"phone": "4155550100"}, "US") is None


def test_phone_of_gives_the_number_to_store() -> None:
    assert phone_of({"phone": "+1 (415) 555-0100"}) == "+14155550100"
    assert phone_of({"phone": "020 7946 0958"}, "GB") == "+442079460958"
    assert phone_of({"phone": "+1 555"}) == "+1 555"  # kept as written; phone_error says why
    assert phone_of({"phone": 5}) is None
    assert phone_of({}) is None
