"""strictjson: orjson's fast path gives exactly what the standard-library path gives."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segflowd import strictjson

# Texts where orjson and the standard library disagree, or that each refuses.
EDGES = [
    b'{"n": 18446744073709551615}', b'{"n": 18446744073709551616}',
    b'{"n": -9223372036854775808}', b'{"n": -9223372036854775809}',
    b"1" + b"0" * 30, b"-" + b"9" * 40, b"1234567890123456789.5",
    b'"\\ud83d\\ude00"', b'{"a": 1, "a": 2}', b"\xef\xbb\xbf{}",
    '{"a": "é"}'.encode("utf-16"), '{"a": 1}'.encode("utf-32"),
    b"[" * 500 + b"]" * 500, b"-0", b"-0.0", b"1E2", b"0.1e-400", b'"\\u0000"', b" {} \n",
]
REFUSED = [
    b"NaN", b'{"a": Infinity}', b"[-Infinity]", b"1e400", b"-1e400", b'"\\ud800"',
    b'{"a": "\\udc00x"}', b"9" * 5000, b'"\xff"', b"[1,]", b'"\x01"', b"", b"{",
    b"\xef\xbb\xbfNaN",
]


def _reference(raw: bytes) -> object:
    return strictjson._loads_stdlib(raw)


@pytest.mark.parametrize("raw", EDGES)
def test_the_fast_path_returns_what_the_standard_library_returns(raw: bytes) -> None:
    got = strictjson.loads(raw)
    assert got == _reference(raw)
    assert type(got) is type(_reference(raw))


def test_an_integer_past_64_bits_stays_an_exact_integer() -> None:
    assert strictjson.loads(b'{"n": 18446744073709551616}') == {"n": 2**64}
    assert strictjson.loads(b"[-9223372036854775809]") == [-(2**63) - 1]


@pytest.mark.parametrize("raw", REFUSED)
def test_what_is_not_standard_json_is_refused_with_the_standard_librarys_error(
        raw: bytes) -> None:
    with pytest.raises(ValueError) as slow:  # noqa: PT011 - any ValueError; compared below
        _reference(raw)
    with pytest.raises(ValueError, match=f"^{re.escape(str(slow.value))}$"):
        strictjson.loads(raw)


def test_deep_nesting_is_a_recursion_error() -> None:
    with pytest.raises(RecursionError):
        strictjson.loads(b"[" * 100_000 + b"]" * 100_000)


_scalars = (st.none() | st.booleans() | st.integers() | st.text()
            | st.floats(allow_nan=False, allow_infinity=False))
_values = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4)
                       | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_values, st.booleans())
def test_any_standard_document_parses_to_the_same_value_as_the_standard_library(
        value: object, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    got = strictjson.loads(raw)
    assert got == _reference(raw)
    assert json.dumps(got) == json.dumps(_reference(raw))  # same types: 1 vs 1.0, exact ints
