"""HMAC-signed tokens for the links in a message: unsubscribe, open pixel, click redirect.

A token is ``base64url(JSON payload) "." base64url(HMAC-SHA256(key, purpose "." payload))``.
The purpose is part of what is signed, so an open-pixel token can never be replayed as
an unsubscribe token. The key comes from ``[email] secret`` (or ``secret_env``); tokens
are signed with it and verified with it and each of ``[email] secret_previous``, so a
rotated secret does not break the links in mail already sent.

Each token has exactly one spelling: unpadded base64url whose spare bits are zero,
nothing before, between or after its two parts. Any other spelling is refused, even one
that decodes to the same bytes, so a link cannot be varied to count an open twice or to
slip past a cache or a log filter keyed on the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping

from ..errors import TokenError

__all__ = ["MAX_TOKEN_LENGTH", "Signer", "ephemeral_key"]

MAX_TOKEN_LENGTH = 4096  # characters: longer is refused before any work is done
_MAC_BYTES = 20  # truncated HMAC-SHA256: 160 bits is ample against forgery
_B64URL = re.compile(r"[A-Za-z0-9_-]+")  # unpadded: no "=", no whitespace, no junk

TokenValue = str | int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    """The bytes ``text`` spells, if it is their one canonical unpadded base64url spelling."""
    if not _B64URL.fullmatch(text):
        raise ValueError("not unpadded base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(raw) != text:  # a length of 4n+1, or non-zero spare bits in the last character
        raise ValueError("not the canonical spelling")
    return raw


def ephemeral_key() -> bytes:
    """A random key for a daemon run without ``[email] secret``: links die on restart."""
    return secrets.token_bytes(32)


def _raw_key(key: bytes | str) -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    if not raw:
        raise ValueError("a token signing key must not be empty")
    return raw


class Signer:
    """Signs and verifies small JSON payloads for one purpose each (``"u"``, ``"o"``, ...).

    ``key`` signs; a token verifies if ``key`` or any of ``previous`` (older keys, kept
    while links signed with them may still be clicked) signed it.
    """

    def __init__(self, key: bytes | str, previous: Iterable[bytes | str] = ()) -> None:
        self._key = _raw_key(key)
        self._keys = (self._key, *(k for k in map(_raw_key, previous) if k != self._key))

    @staticmethod
    def _mac(key: bytes, purpose: str, payload: str) -> bytes:
        msg = f"{purpose}.{payload}".encode("ascii")
        return hmac.new(key, msg, hashlib.sha256).digest()[:_MAC_BYTES]

    def sign(self, purpose: str, data: Mapping[str, TokenValue]) -> str:
        """A URL-safe token carrying ``data`` (strings and ints) for ``purpose``."""
        body = json.dumps(dict(data), separators=(",", ":"), sort_keys=True,
                          ensure_ascii=True).encode()
        payload = _b64(body)
        return f"{payload}.{_b64(self._mac(self._key, purpose, payload))}"

    def verify(self, purpose: str, token: str) -> dict[str, TokenValue]:
        """The data ``token`` carries; :class:`TokenError` if it is not ours for ``purpose``."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
            raise TokenError("malformed token")
        payload, mac = token.split(".")
        try:
            given = _unb64(mac)
            body = _unb64(payload)
            purpose.encode("ascii")
        except (ValueError, binascii.Error, UnicodeEncodeError):
            raise TokenError("malformed token") from None
        # Every key is tried (no early exit), so the time taken says nothing of which.
        matches = [hmac.compare_digest(given, self._mac(k, purpose, payload))
                   for k in self._keys]
        if not any(matches):
            raise TokenError("token signature does not verify")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise TokenError("malformed token payload") from None
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str | int) for k, v in data.items()):
            raise TokenError("malformed token payload")
        return data
