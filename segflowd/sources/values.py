"""Customer-database values as JSON: what a data source's rows become for users,
templates and replies."""

from __future__ import annotations

import datetime as dt
import decimal
import math
import uuid

from ..errors import SourceError

__all__ = ["JSON_INT_LIMIT", "json_row", "json_value"]

JSON_INT_LIMIT = 2**63  # integers at or beyond this (in magnitude) become their string

Row = dict[str, object]


def json_value(value: object) -> object:
    """A customer-database value as JSON (user attributes, template context, replies).

    Numbers JSON cannot hold are strings: ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` for
    non-finite numbers, and the decimal text of a number beyond a float's range or an
    integer beyond 64 bits (``"1E+400"``, ``"123456789012345678901234567890"``).
    """
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < JSON_INT_LIMIT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else _non_finite(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return _decimal(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def json_row(row: Row, *, source: str, what: str) -> Row:
    """``row`` with every value through :func:`json_value`; SourceError naming the column
    whose value cannot be converted (it fails that one query, never the daemon)."""
    out: Row = {}
    for key, value in row.items():
        try:
            out[key] = json_value(value)
        except Exception as exc:
            raise SourceError(source, f"{what}: column {key!r} holds a value that cannot be "
                                      f"converted to JSON ({type(exc).__name__}: {exc})"
                              ) from None
    return out


def _non_finite(value: float | decimal.Decimal) -> str:
    if value != value:  # NaN is the one value unequal to itself
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _decimal(value: decimal.Decimal) -> object:
    if not value.is_finite():
        return _non_finite(value)
    if value == value.to_integral_value():
        # adjusted() is the exponent of the leading digit: no huge int is ever built
        if value.adjusted() < 19 and abs(value) < JSON_INT_LIMIT:
            return int(value)
        return str(value)
    as_float = float(value)
    return as_float if math.isfinite(as_float) else str(value)
