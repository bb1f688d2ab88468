"""The control socket's wire format: JSON lines, versioned (docs/reference/control-protocol.md).

Every line is one JSON object ending in ``\\n``. On connect the daemon sends a hello::

    {"hello": "segflowd", "protocol": 1, "version": "0.1.0"}

then answers each request line in order::

    {"id": 7, "op": "campaign", "args": {"name": "welcome"}}
    {"id": 7, "ok": true, "result": {...}}
    {"id": 8, "ok": false, "error": {"code": "not_available", "message": "..."}}

After a successful ``subscribe`` the connection only streams::

    {"stream": [{"seq": 1, "kind": "flow.step", "at": "...Z", ...}, ...],
     "missed": 0, "missed_total": 0}

A client may rely on: ``protocol`` only ever grows by adding ops and fields; an op it
does not know gets an ``unknown_op`` error, never a dropped connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import decimal
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from .. import strictjson

__all__ = [
    "ACTIONS",
    "ERROR_CODES",
    "MAX_LINE",
    "OPS",
    "PROTOCOL_VERSION",
    "BadRequest",
    "Request",
    "decode_request",
    "dumps",
    "error_reply",
    "ok_reply",
    "request_id",
    "to_jsonable",
    "unix_address",
]

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024  # bytes: the longest request line the daemon reads
SUN_PATH_MAX = 100  # bytes: longer socket paths are reached through /proc/self/fd

# The read-only and streaming ops; "action" runs one of ACTIONS.
OPS = ("hello", "status", "campaigns", "campaign", "segments", "user", "messages",
       "actions", "subscribe", "action")
ACTIONS = ("campaign.pause", "campaign.resume", "segment.refresh", "email.test",
           "message.retry", "instance.terminate", "instance.restart", "instance.wake",
           "audiences.list", "audiences.pick", "broadcast.launch", "report")
ERROR_CODES = (
    "bad_request",      # not JSON, not an object, a missing or wrong argument
    "unknown_op",       # an op this daemon does not know
    "not_found",        # the campaign / user / ... named does not exist
    "not_available",    # an action this daemon has no service for
    "action_failed",    # the action refused (its message says why)
    "store_unavailable",  # the store could not be reached; retry later
    "internal",         # a bug: the daemon logged it; the connection stays open
)


class BadRequest(ValueError):
    """A request line that cannot be served; ``code`` is one of ERROR_CODES."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Request:
    id: object
    op: str
    args: Mapping[str, object]

    def str_arg(self, name: str) -> str:
        value = self.args.get(name)
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{self.op} needs a non-empty string argument {name!r}")
        return value

    def int_arg(self, name: str, default: int, *, lo: int = 1, hi: int = 1000) -> int:
        value = self.args.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"{self.op}: argument {name!r} must be an integer")
        if not lo <= value <= hi:
            raise BadRequest(f"{self.op}: argument {name!r} must be between {lo} and {hi}")
        return value


def decode_request(line: bytes) -> Request:
    """Parse one request line; BadRequest says what is wrong with it."""
    try:
        data = strictjson.loads(line)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise BadRequest(f"request is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("request must be a JSON object with an 'op'")
    op = data.get("op")
    rid = data.get("id")
    if not isinstance(op, str) or not op:
        raise BadRequest("request needs an 'op' string")
    args = data.get("args", {})
    if not isinstance(args, dict):
        raise BadRequest("'args' must be a JSON object")
    if op not in OPS:
        raise BadRequest(f"unknown op {op!r} (known: {', '.join(OPS)})", "unknown_op")
    return Request(rid, op, args)


def request_id(line: bytes) -> object:
    """The id of a request line that failed to decode, when it can still be read."""
    try:
        data = strictjson.loads(line)
    except (ValueError, RecursionError):
        return None
    return data.get("id") if isinstance(data, dict) else None


def to_jsonable(value: object) -> object:
    """Datetimes as ISO-8601 UTC, dataclasses as objects, anything else readable."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.datetime):
        return value.isoformat() + ("Z" if value.tzinfo is None else "")
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _default(value: object) -> object:
    converted = to_jsonable(value)
    if converted is value:  # pragma: no cover - to_jsonable always converts the rest
        return str(value)
    return converted


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_default)


def dumps(message: Mapping[str, object]) -> bytes:
    """One protocol line (the JSON encoder converts only what it cannot write itself)."""
    return _ENCODER.encode(message).encode() + b"\n"


def ok_reply(rid: object, result: object) -> bytes:
    return dumps({"id": rid, "ok": True, "result": result})


def error_reply(rid: object, code: str, message: str) -> bytes:
    return dumps({"id": rid, "ok": False, "error": {"code": code, "message": message}})


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits a unix socket's ~107-byte limit.

    A longer path is reached through an open descriptor of its folder
    (``/proc/self/fd/N/name``, Linux), valid while the block runs.
    """
    if len(os.fsencode(path)) <= SUN_PATH_MAX or not os.path.isdir("/proc/self/fd"):
        yield str(path)
        return
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield str(path)  # the caller's bind/connect reports the folder's problem
        return
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)
