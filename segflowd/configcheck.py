"""Checks of the ``[store]`` and ``[http]`` values of segflow.toml (see :mod:`segflowd.config`).

Split from config.py to keep that module one concern (and under its size limit): the
parser builds typed sections, these functions refuse values that type-check but make
no sense (a zero timeout, a header cap too small for any real client). Each failure is
the ConfigError that ``error(key, message)`` makes, naming file, key and line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

from .errors import ConfigError

__all__ = ["check_cors_origins", "check_http", "check_store"]

MIN_HEADER_BYTES = 1024  # bytes: a request line and a few headers always fit
MIN_HEADERS = 8  # headers: what any HTTP client sends at least
MIN_BODY_BYTES = 1024  # bytes: max_event_bytes and max_request_bytes, at least

ErrorFactory = Callable[[str, str], ConfigError]


class _Store(Protocol):
    @property
    def url(self) -> str: ...
    @property
    def pool_size(self) -> int: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def timeout(self) -> float: ...


class _Key(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def secret(self) -> str: ...


class _Http(Protocol):
    @property
    def listen(self) -> str: ...
    @property
    def public_url(self) -> str: ...
    @property
    def keys(self) -> Sequence[_Key]: ...
    @property
    def max_event_bytes(self) -> int: ...
    @property
    def max_request_bytes(self) -> int: ...
    @property
    def header_timeout(self) -> float: ...
    @property
    def body_timeout(self) -> float: ...
    @property
    def keepalive_timeout(self) -> float: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def max_header_bytes(self) -> int: ...
    @property
    def max_headers(self) -> int: ...


def check_store(s: _Store, error: ErrorFactory) -> None:
    if not re.match(r"^(sqlite\+aiosqlite|mysql\+aiomysql|mysql\+asyncmy)://", s.url):
        raise error("store.url",
                    "must start with sqlite+aiosqlite://, mysql+aiomysql:// or mysql+asyncmy://")
    if s.pool_size < 1:
        raise error("store.pool_size", "must be at least 1")
    for key in ("connect_timeout", "timeout"):
        if not getattr(s, key) > 0:
            raise error(f"store.{key}", "must be a positive number of seconds")


def check_http(h: _Http, error: ErrorFactory) -> None:
    m = re.match(r"^(\[[0-9a-fA-F:]+\]|[^:\[\]]+):(\d{1,5})$", h.listen)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise error("http.listen", f"must be HOST:PORT, got {h.listen!r}")
    if h.public_url and not re.match(r"^https?://", h.public_url):
        raise error("http.public_url", "must start with http:// or https://")
    names = set()
    for i, k in enumerate(h.keys):
        if not k.name or not k.secret:
            raise error(f"http.keys[{i}]", "needs a name and a non-empty secret")
        if k.name in names:
            raise error(f"http.keys[{i}].name", f"duplicate key name {k.name!r}")
        names.add(k.name)
    for limit in ("max_event_bytes", "max_request_bytes"):
        if getattr(h, limit) < MIN_BODY_BYTES:
            raise error(f"http.{limit}", f"must be at least {MIN_BODY_BYTES}")
    for key in ("header_timeout", "body_timeout", "keepalive_timeout"):
        if not getattr(h, key) > 0:
            raise error(f"http.{key}", "must be a positive number of seconds")
    if h.max_connections < 1:
        raise error("http.max_connections", "must be at least 1")
    if h.max_header_bytes < MIN_HEADER_BYTES:
        raise error("http.max_header_bytes", f"must be at least {MIN_HEADER_BYTES}")
    if h.max_headers < MIN_HEADERS:
        raise error("http.max_headers", f"must be at least {MIN_HEADERS}")


_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#\s@]+$")  # scheme://host[:port], nothing after


def check_cors_origins(origins: Sequence[str], error: ErrorFactory) -> None:
    """``[http] cors_origins``: ``["*"]`` alone, or origins as a browser sends them."""
    for i, origin in enumerate(origins):
        if origin == "*":
            if len(origins) > 1:
                raise error(f"http.cors_origins[{i}]", '"*" allows every origin: list it '
                            "alone, or list the origins without it")
        elif not _ORIGIN.match(origin) or origin != origin.lower():
            raise error(f"http.cors_origins[{i}]", f"{origin[:100]!r} is not an origin: "
                        "write scheme://host[:port] in lower case, with no path or "
                        'trailing slash (e.g. "https://www.example.com")')
