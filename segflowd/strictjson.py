"""Standard JSON only, for everything that parses input (HTTP bodies, control requests).

Python's ``json.loads`` also takes ``NaN``, ``Infinity`` and numbers that overflow to
``inf`` (``1e400``), none of which is JSON and none of which can be written back as
JSON; and an unpaired surrogate escape (``"\\ud800"``), which is no character, so it can
be neither stored as UTF-8 nor sent back. :func:`loads` refuses all of them with
ValueError (integers of over 4300 digits too); deep nesting raises RecursionError.

The common case goes through orjson (a C parser that refuses all of the above by
itself, about ten times faster than ``json``). Whatever orjson refuses, and every
text that may hold an integer past 64 bits (which orjson would turn into a float), is
parsed again by the standard library, so the value and the error a client sees are
the same either way.
"""

from __future__ import annotations

import json
import math
import re

import orjson

__all__ = ["loads"]

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# 19 digits in a row may be an integer outside orjson's 64-bit range (-2**63 .. 2**64-1).
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def loads(raw: bytes) -> object:
    """Parse ``raw`` (UTF-8, -16 or -32) as standard JSON; ValueError otherwise
    (UnicodeDecodeError and json.JSONDecodeError are ValueErrors)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _loads_stdlib(raw)  # the standard library's verdict and its error message
    if _LONG_DIGITS.search(raw) is not None:
        return _loads_stdlib(raw)
    return data


def _loads_stdlib(raw: bytes) -> object:
    data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    # The surrogate check re-encodes the value: only when the text may hold one.
    if _SURROGATE_ESCAPE.search(raw) is not None or json.detect_encoding(raw) != "utf-8":
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("an unpaired surrogate escape (\\ud800-\\udfff) is not a "
                             "character") from None
    return data
