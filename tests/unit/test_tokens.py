"""Signed tokens: round trip, forgery, purpose binding."""

from __future__ import annotations

import pytest

from segflowd.delivery.tokens import MAX_TOKEN_LENGTH, Signer
from segflowd.errors import TokenError


def test_a_signed_token_verifies_and_returns_its_data() -> None:
    s = Signer("key")
    token = s.sign("c", {"m": 42, "l": "https://example.com/a?b=1&c=ü"})
    assert s.verify("c", token) == {"m": 42, "l": "https://example.com/a?b=1&c=ü"}
    assert all(ch.isalnum() or ch in "-_." for ch in token)  # URL-safe as is


@pytest.mark.parametrize("bad", ["", "abc", "a.b.c", "!!!.???", "x" * (MAX_TOKEN_LENGTH + 1)])
def test_malformed_tokens_are_refused(bad: str) -> None:
    with pytest.raises(TokenError):
        Signer("key").verify("u", bad)


def test_another_key_or_purpose_or_payload_does_not_verify() -> None:
    token = Signer("key").sign("u", {"u": "user-1"})
    with pytest.raises(TokenError, match="does not verify"):
        Signer("other").verify("u", token)
    with pytest.raises(TokenError, match="does not verify"):
        Signer("key").verify("o", token)
    other_payload = Signer("key").sign("u", {"u": "user-2"}).split(".")[0]
    with pytest.raises(TokenError, match="does not verify"):
        Signer("key").verify("u", other_payload + "." + token.split(".")[1])


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        Signer("")
