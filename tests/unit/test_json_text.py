"""Store.json_text: the text of JSON columns, written by orjson with json.dumps behind it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest

from segflowd.store import json_text


@pytest.mark.parametrize("value", [
    {}, {"plan": "pro", "n": 3, "ratio": 0.1, "ok": True, "none": None},
    {"nested": {"list": [1, "two", {"three": 3.5}]}},
    {"unicode": "é中😀 \\ \" ' %s", "emoji 🎉": "k"},
    [1, -2**63, 2**64 - 1, 1e300, -0.0], "text", 7,
])
def test_the_same_json_value_as_json_dumps(value: object) -> None:
    text = json_text(value)
    assert json.loads(text) == json.loads(json.dumps(value))
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_what_orjson_will_not_write_goes_to_json_dumps() -> None:
    # Integers past 64 bits and keys that are not strings: stored as json.dumps writes them.
    assert json.loads(json_text({"big": 2**70})) == {"big": 2**70}
    assert json.loads(json_text({1: "one"})) == {"1": "one"}


@dataclasses.dataclass
class _Point:
    x: int


@pytest.mark.parametrize("value", [dt.datetime(2026, 1, 1), _Point(1), {1, 2}])
def test_values_json_dumps_refuses_are_still_refused(value: object) -> None:
    with pytest.raises(TypeError):
        json_text({"v": value})


def test_a_float_that_is_not_a_number_is_null_not_the_invalid_nan() -> None:
    assert json_text([float("nan"), float("inf")]) == "[null,null]"
