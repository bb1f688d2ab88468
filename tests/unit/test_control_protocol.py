from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import json

import pytest

from segflowd.control.protocol import (
    BadRequest,
    decode_request,
    dumps,
    error_reply,
    ok_reply,
    request_id,
    to_jsonable,
)


def test_a_request_line_decodes_into_id_op_and_args() -> None:
    req = decode_request(b'{"id": 9, "op": "user", "args": {"id": "u1"}}\n')
    assert (req.id, req.op, dict(req.args)) == (9, "user", {"id": "u1"})
    assert req.str_arg("id") == "u1"


@pytest.mark.parametrize(("line", "code", "fragment"), [
    (b"{nope", "bad_request", "not valid JSON"),
    (b"[]", "bad_request", "JSON object"),
    (b'{"args": {}}', "bad_request", "needs an 'op'"),
    (b'{"op": "status", "args": [1]}', "bad_request", "'args' must be a JSON object"),
    (b'{"op": "shutdown"}', "unknown_op", "unknown op 'shutdown'"),
    (b"\xff\xfe", "bad_request", "not valid JSON"),
])
def test_bad_request_lines_say_what_is_wrong(line: bytes, code: str, fragment: str) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_request(line)
    assert caught.value.code == code
    assert fragment in str(caught.value)


def test_arguments_are_checked_by_type_and_range() -> None:
    req = decode_request(b'{"op": "messages", "args": {"limit": 5000, "name": 3}}')
    with pytest.raises(BadRequest, match="between 1 and 1000"):
        req.int_arg("limit", 100)
    with pytest.raises(BadRequest, match="non-empty string argument 'name'"):
        req.str_arg("name")
    assert decode_request(b'{"op": "messages"}').int_arg("limit", 100) == 100


def test_the_id_of_a_rejected_request_is_echoed_when_readable() -> None:
    assert request_id(b'{"id": "abc", "op": 1}') == "abc"
    assert request_id(b"garbage") is None


@dataclasses.dataclass(frozen=True)
class Stats:
    n: int
    at: dt.datetime
    names: tuple[str, ...]


def test_dataclasses_times_and_decimals_become_plain_json() -> None:
    value = {"s": Stats(1, dt.datetime(2026, 1, 2, 3, 4, 5), ("a",)),
             "d": decimal.Decimal("1.5"), "span": dt.timedelta(minutes=1), "set": {3}}
    assert to_jsonable(value) == {"s": {"n": 1, "at": "2026-01-02T03:04:05Z", "names": ["a"]},
                                  "d": 1.5, "span": 60.0, "set": [3]}
    line = dumps({"x": Stats(2, dt.datetime(2026, 1, 1), ())})
    assert line.endswith(b"\n")
    assert json.loads(line) == {"x": {"n": 2, "at": "2026-01-01T00:00:00Z", "names": []}}


def test_replies_carry_the_request_id_and_ok_or_error() -> None:
    assert json.loads(ok_reply(4, [1])) == {"id": 4, "ok": True, "result": [1]}
    assert json.loads(error_reply(5, "not_found", "no user")) == {
        "id": 5, "ok": False, "error": {"code": "not_found", "message": "no user"}}
