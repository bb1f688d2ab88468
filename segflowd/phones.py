"""Users' phone numbers: checked and normalised to E.164 (``+14155550100``).

The ``phone`` attribute is what an SMS goes to. It is checked with ``phonenumbers``
(Google's libphonenumber metadata): a number must be *valid* for its country (a
plausible length is not enough), and is stored and sent in E.164, the only form SMS
APIs take. A number written without ``+`` and a country code is read as a number of
the configured default region, and is an error when there is none: guessing a country
would text a stranger.

This is the only module that uses ``phonenumbers``, so its metadata and its quirks stay
in one place.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Mapping

import phonenumbers

__all__ = ["PHONE_ATTRIBUTE", "check_phone", "phone_error", "phone_of", "region_error"]

PHONE_ATTRIBUTE = "phone"
_CACHE_SIZE = 4096  # numbers: an import of a few thousand users checks each once


@functools.lru_cache(maxsize=_CACHE_SIZE)
def check_phone(value: str, default_region: str | None = None) -> tuple[str, str | None]:
    """``(E.164 number, None)`` for a valid phone number, else ``(value, why)``.

    ``value`` may be written in any usual way (``+1 (415) 555-0100``, ``+44 20 7946
    0958``); without a leading ``+`` (or ``00``-style international prefix of the
    region) it is read as a number of ``default_region`` (ISO 3166 alpha-2, ``"US"``).
    A number with an extension is not valid here: no SMS reaches an extension.
    """
    # Compatibility forms first: a full-width plus sign or digits, a no-break or thin space
    # pasted from a document, are the plain characters a person meant.
    folded = unicodedata.normalize("NFKC", value)
    if any(not c.isprintable() for c in folded):
        return value, (f"{value!r} is not a valid phone number: it contains a line break "
                       "or another control character")
    text = folded.strip()
    if not text:
        return value, "the phone number is empty"
    region = default_region.upper() if default_region else None
    if not text.startswith("+") and region is None:
        return value, (f"{value!r} has no country code: write it in international form "
                       "(+ and the country code, such as +14155550100), or configure a "
                       "default region for numbers written without one")
    if region is not None and (problem := region_error(region)) is not None:
        return value, problem
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as exc:
        return value, f"{value!r} is not a valid phone number: {_parse_reason(exc)}"
    if number.extension:
        return value, (f"{value!r} has an extension ({number.extension}): an SMS cannot "
                       "go to an extension")
    if not phonenumbers.is_valid_number(number):
        where = phonenumbers.region_code_for_number(number)
        country = f"+{number.country_code}"
        return value, (f"{value!r} is not a valid phone number: no number of "
                       f"{country}" + (f" ({where})" if where and where != "ZZ" else "")
                       + " has this length or prefix")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


def region_error(region: str) -> str | None:
    """Why ``region`` is not a default region phone numbers can be read in, or None."""
    if region.upper() in phonenumbers.SUPPORTED_REGIONS:
        return None
    return (f"{region!r} is not a region phone numbers can be read in: give an ISO 3166 "
            "two-letter country code such as \"US\" or \"GB\"")


def phone_of(attributes: Mapping[str, object],
             default_region: str | None = None) -> str | None:
    """The user's phone number in E.164 when ``attributes["phone"]`` is a valid one;
    the value as written when it is an invalid string (then :func:`phone_error` says
    why); None when there is none (missing, null, blank or not a string)."""
    value = attributes.get(PHONE_ATTRIBUTE)
    if isinstance(value, str) and value.strip():
        return check_phone(value.strip(), default_region)[0]
    return None


def phone_error(attributes: Mapping[str, object],
                default_region: str | None = None) -> str | None:
    """Why the user's ``phone`` attribute is not a number an SMS can go to, or None
    when it is one or when there is none (missing, null or blank: no phone is no
    error, the user just gets no SMS)."""
    value = attributes.get(PHONE_ATTRIBUTE)
    if value is None:
        return None
    if not isinstance(value, str):
        return (f"the phone attribute must be a string such as \"+14155550100\", not "
                f"{type(value).__name__} {value!r}"[:300])
    if not value.strip():
        return None
    return check_phone(value.strip(), default_region)[1]


_PARSE_REASONS = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "its country code is unknown",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "it is not a number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "it is too short",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "it is too short",
    phonenumbers.NumberParseException.TOO_LONG: "it is too long",
}


def _parse_reason(exc: phonenumbers.NumberParseException) -> str:
    return _PARSE_REASONS.get(exc.error_type, str(exc))
