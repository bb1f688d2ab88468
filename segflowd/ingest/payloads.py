"""Validation shared by the three ingest APIs: a bad value is a 400 naming the field.

Every function raises :class:`~segflowd.http.HTTPError` with a message of the form
``"<field>: <problem>"``, so a client learns exactly what to fix.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Mapping

from ..http import HTTPError

__all__ = [
    "ID_MAX",
    "NAME_MAX",
    "check_size",
    "dedupe_key",
    "field_error",
    "only_fields",
    "opt_id",
    "opt_object",
    "opt_time",
    "require_id",
    "require_name",
    "require_object",
    "signup_time",
    "time_in_range",
]

ID_MAX = 191  # characters: users.id / events.anonymous_id width
NAME_MAX = 191  # characters: events.name width
DEDUPE_MAX = 255  # characters: events.dedupe_key width
_EPOCH = dt.datetime(1970, 1, 1)
_YEAR_MIN, _YEAR_MAX = 1970, 9999


def field_error(field: str, problem: str) -> HTTPError:
    return HTTPError(400, "invalid_field", f"{field}: {problem}")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def require_object(value: object, field: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise field_error(field, f"must be a JSON object, not {_kind(value)}")
    return value


def only_fields(body: dict[str, object], allowed: frozenset[str], hint: str) -> None:
    """Refuse a top-level field the route does not read (a typo, or attributes put at the
    top level), rather than accept the request and silently drop it."""
    for key in body:
        if key not in allowed:
            known = ", ".join(f'"{k}"' for k in sorted(allowed))
            raise field_error(key[:100], f"is not a field of this request (it takes {known}"
                                         f"{hint})")


def opt_object(value: object, field: str) -> dict[str, object]:
    """An optional object: missing or null is ``{}``."""
    return {} if value is None else require_object(value, field)


def opt_id(value: object, field: str) -> str | None:
    """An optional id: a non-empty string (or integer, as Segment allows); null is None."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise field_error(field, f"must be a string, not {_kind(value)}")
    if len(value) > ID_MAX:
        raise field_error(field, f"is {len(value)} characters long; the limit is {ID_MAX}")
    return value


def require_id(value: object, field: str) -> str:
    out = opt_id(value, field)
    if out is None:
        raise field_error(field, "is required")
    return out


def require_name(value: object, field: str) -> str:
    if value is None or value == "":
        raise field_error(field, "is required")
    if not isinstance(value, str):
        raise field_error(field, f"must be a string, not {_kind(value)}")
    if len(value) > NAME_MAX:
        raise field_error(field, f"is {len(value)} characters long; the limit is {NAME_MAX}")
    return value


def opt_time(value: object, field: str) -> dt.datetime | None:
    """ISO 8601 (an offset is converted; none means UTC) or Unix seconds → naive UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise field_error(field, "must be a finite number of Unix seconds")
        seconds = float(value)
        if seconds > 1e11:  # milliseconds, as some clients send
            seconds /= 1000
        try:
            parsed = _EPOCH + dt.timedelta(seconds=seconds)
        except OverflowError:
            raise field_error(field, "is out of range") from None
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            raise field_error(field, f"is not an ISO 8601 time: {value[:40]!r}") from None
        if parsed.tzinfo is not None:
            try:
                parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
            except OverflowError:  # 9999-12-31T23:00-14:00 is in year 10000 in UTC
                raise field_error(field, "is out of range") from None
    else:
        raise field_error(field, f"must be an ISO 8601 string or Unix seconds, not {_kind(value)}")
    if not _YEAR_MIN <= parsed.year <= _YEAR_MAX:
        raise field_error(field, f"is out of range ({parsed.year})")
    return parsed


def time_in_range(value: dt.datetime) -> bool:
    """Whether ``value`` is within the years the store keeps (as :func:`opt_time` checks)."""
    return _YEAR_MIN <= value.year <= _YEAR_MAX


SIGNUP_KEYS = ("createdAt", "created_at")  # traits / attributes holding a signup time


def signup_time(attributes: Mapping[str, object], field: str) -> dt.datetime | None:
    """The signup time in ``attributes`` (``createdAt``, else ``created_at``; ISO 8601 or
    Unix seconds), which becomes users.created_at; 400 naming ``field.key`` if invalid."""
    for key in SIGNUP_KEYS:
        value = attributes.get(key)
        if value is not None:
            return opt_time(value, f"{field}.{key}")
    return None


def check_size(obj: object, limit: int | None, field: str) -> None:
    """413 when one event (or user) is larger than ``limit`` bytes of JSON.

    ``None`` skips the check: the caller knows the whole request is within the limit.
    """
    if limit is None:
        return
    size = len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                          default=str).encode())
    if size > limit:
        raise HTTPError(413, "too_large", f"{field}: {size} bytes; the limit per event is "
                        f"{limit} bytes")


def dedupe_key(namespace: str, owner: str, client_id: object, field: str) -> str | None:
    """The events.dedupe_key of a client event id, per API and per user.

    ``n`` (native), ``s`` (Segment) and ``c`` (Customer.io) ids never collide with each
    other, nor one user's ids with another's. Long keys are hashed to fit the column.
    """
    if client_id is None or client_id == "":
        return None
    if isinstance(client_id, int | float) and not isinstance(client_id, bool):
        client_id = str(client_id)
    if not isinstance(client_id, str):
        raise field_error(field, f"must be a string, not {_kind(client_id)}")
    key = f"{namespace}:{len(owner)}:{owner}:{client_id}"
    if len(key) > DEDUPE_MAX:
        digest = hashlib.sha256(f"{owner}\0{client_id}".encode()).hexdigest()
        key = f"{namespace}:h:{digest}"
    return key
