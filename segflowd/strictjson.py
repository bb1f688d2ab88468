"""Standard JSON only, for everything that parses input (HTTP bodies, control requests).

Python's ``json.loads`` also takes ``NaN``, ``Infinity`` and numbers that overflow to
``inf`` (``1e400``), none of which is JSON and none of which can be written back as
JSON; and an unpaired surrogate escape (``"\\ud800"``), which is no character, so it can
be neither stored as UTF-8 nor sent back. :func:`loads` refuses all of them with
ValueError (integers of over 4300 digits too); deep nesting raises RecursionError.
"""

from __future__ import annotations

import json
import math
import re

__all__ = ["loads"]

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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
    data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    # The surrogate check re-encodes the value: only when the text may hold one.
    if _SURROGATE_ESCAPE.search(raw) is not None or json.detect_encoding(raw) != "utf-8":
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("an unpaired surrogate escape (\\ud800-\\udfff) is not a "
                             "character") from None
    return data
