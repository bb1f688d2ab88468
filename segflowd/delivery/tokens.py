"""HMAC-signed tokens for the links in a message: unsubscribe, open pixel, click redirect.

A token is ``base64url(JSON payload) "." base64url(HMAC-SHA256(key, purpose "." payload))``.
The purpose is part of what is signed, so an open-pixel token can never be replayed as
an unsubscribe token. The key comes from ``[email] secret`` (or ``secret_env``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping

from ..errors import TokenError

__all__ = ["MAX_TOKEN_LENGTH", "Signer", "ephemeral_key"]

MAX_TOKEN_LENGTH = 4096  # characters: longer is refused before any work is done
_MAC_BYTES = 20  # truncated HMAC-SHA256: 160 bits is ample against forgery

TokenValue = str | int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def ephemeral_key() -> bytes:
    """A random key for a daemon run without ``[email] secret``: links die on restart."""
    return secrets.token_bytes(32)


class Signer:
    """Signs and verifies small JSON payloads for one purpose each (``"u"``, ``"o"``, ...)."""

    def __init__(self, key: bytes | str) -> None:
        raw = key.encode() if isinstance(key, str) else key
        if not raw:
            raise ValueError("a token signing key must not be empty")
        self._key = raw

    def _mac(self, purpose: str, payload: str) -> bytes:
        msg = f"{purpose}.{payload}".encode("ascii")
        return hmac.new(self._key, msg, hashlib.sha256).digest()[:_MAC_BYTES]

    def sign(self, purpose: str, data: Mapping[str, TokenValue]) -> str:
        """A URL-safe token carrying ``data`` (strings and ints) for ``purpose``."""
        body = json.dumps(dict(data), separators=(",", ":"), sort_keys=True,
                          ensure_ascii=True).encode()
        payload = _b64(body)
        return f"{payload}.{_b64(self._mac(purpose, payload))}"

    def verify(self, purpose: str, token: str) -> dict[str, TokenValue]:
        """The data ``token`` carries; :class:`TokenError` if it is not ours for ``purpose``."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
            raise TokenError("malformed token")
        payload, mac = token.split(".")
        try:
            given = _unb64(mac)
            body = _unb64(payload)
        except (ValueError, UnicodeEncodeError):
            raise TokenError("malformed token") from None
        try:
            expected = self._mac(purpose, payload)
        except UnicodeEncodeError:
            raise TokenError("malformed token") from None
        if not hmac.compare_digest(given, expected):
            raise TokenError("token signature does not verify")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise TokenError("malformed token payload") from None
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str | int) for k, v in data.items()):
            raise TokenError("malformed token payload")
        return data
