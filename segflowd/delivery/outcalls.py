"""Outbound webhooks: what ``[webhooks] allow`` lets a flow call, and the call itself.

The allow-list is the guard against a flow (or data it interpolates into a URL) reaching
into the machine's own network (SSRF). A URL must be ``http``/``https`` and match one of
the ``allow`` patterns (``*`` and ``?`` wildcards on the whole URL). On top of that, a
host that is, or resolves to, an address that is not globally routable (loopback,
link-local, private, reserved, multicast, unspecified, shared) is refused unless a
matching pattern names that very host, with no wildcard in its host part: allowing
``https://*`` does not open ``http://127.0.0.1/``, while ``http://127.0.0.1:8080/*`` does.

:func:`literal_refusal` judges the URL alone (``segflowd check``, no DNS);
:func:`refusal` also resolves the host and judges every address it resolves to (send time);
the call then connects to the addresses of one resolution, each judged again
(:func:`address_refusal`, :mod:`segflowd.delivery.pinned`), so a name that rebinds to
loopback after the check is refused, not called.

:func:`call` makes one attempt and sorts what happened into an :class:`Outcome`:
``answered`` (any status but a 5xx or 429: the flow sees it, a 4xx included), ``retry``
(a connection error, a timeout, a 5xx, a 429, whose ``Retry-After`` is honoured) or
``refused`` (the allow-list: never retried). Every call carries ``Idempotency-Key`` (the
step's dedupe key, the same on every attempt) and the secret headers configured for URLs
it matches; those are never logged or stored. The answer's body is read as a stream and
kept only up to ``max_body`` bytes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import fnmatch
import ipaddress
import json
import random
import socket
from collections.abc import Callable, Mapping
from typing import Literal
from urllib.parse import urlsplit

import anyio
import httpx

from ..configchannels import WebhooksConfig
from .pinned import RefusedAddress

__all__ = ["Outcome", "backoff", "call", "literal_refusal", "parse_retry_after", "refusal",
           "secret_headers"]

OutcomeKind = Literal["answered", "retry", "refused", "failed"]  # failed: ours, for good
_WILDCARDS = frozenset("*?")
MAX_ERROR = 300  # characters of an error kept on the message row


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One attempt's result. ``response`` (answered): ``{"status", "headers", "json",
    "truncated"}``; ``error``: a sentence for the message row and the flow;
    ``retry_after``: seconds the receiver asked for (429/5xx), None when it did not."""

    kind: OutcomeKind
    response: dict[str, object] | None = None
    error: str | None = None
    retry_after: float | None = None


def _host(url: str) -> tuple[str, str, int] | str:
    """(scheme, lower-case host, port) of ``url``, or why it cannot be called."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "is not an http:// or https:// URL"
    host = (parts.hostname or "").lower()
    if not host:
        return "has no host"
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def _explicit(pattern: str, host: str) -> bool:
    """Whether ``pattern`` names ``host`` itself (no wildcard in the pattern's host part)."""
    parts = _split(pattern)
    return parts is not None and not (_WILDCARDS & set(parts[1])) and parts[1] == host


def _glob(text: str, pattern: str) -> bool:
    """``fnmatch`` with ``*`` and ``?`` only: brackets are literal (``[::1]``)."""
    escaped = "".join("[[]" if c == "[" else "[]]" if c == "]" else c for c in pattern)
    return fnmatch.fnmatchcase(text, escaped)


def _split(url: str) -> tuple[str, str, str, str] | None:
    """(scheme, host, port, path and query) of a URL or pattern; None when malformed.

    The host is the netloc less user info and port, lower-cased; the port is the one
    written, else the scheme's default (``*`` in a pattern stays ``*``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    netloc = parts.netloc.rpartition("@")[2].lower()
    if netloc.startswith("["):
        host, _, tail = netloc[1:].partition("]")
        port = tail.removeprefix(":")
    elif netloc.count(":") == 1:
        host, _, port = netloc.partition(":")
    else:
        host, port = netloc, ""
    wild = bool(_WILDCARDS & set(host))
    # A pattern's host with a wildcard and no port takes any port ("http://*"); a URL,
    # or a named host, has the scheme's. A pattern with no path takes any path.
    port = port or ("*" if wild else {"https": "443", "http": "80"}.get(parts.scheme, ""))
    rest = (parts.path or ("*" if wild or not parts.query else "/")) + (
        f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port, rest


def _fits(url: str, pattern: str) -> bool:
    """Whether ``url`` matches ``pattern`` part by part: the same scheme, the host and the
    port each matched on their own (so a ``*`` in the host never reaches into the path:
    ``https://*.partner.test/*`` does not allow ``https://evil.test/.partner.test/``),
    then the path and query."""
    u, p = _split(url), _split(pattern)
    if u is None or p is None or u[0] != p[0]:
        return False
    return _glob(u[1], p[1]) and _glob(u[2], p[2]) and _glob(u[3], p[3])


def _matching(url: str, cfg: WebhooksConfig) -> list[str]:
    return [p for p in cfg.allow if _fits(url, p)]


def _internal(address: str) -> bool:
    """Whether ``address`` (an IP literal) is not a public, routable unicast address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (not ip.is_global or ip.is_multicast or ip.is_loopback or ip.is_link_local
            or ip.is_private or ip.is_reserved or ip.is_unspecified)


def literal_refusal(url: str, cfg: WebhooksConfig) -> str | None:
    """Why ``url`` may not be called, judging the URL alone (no DNS); None: allowed so far."""
    where = _host(url)
    if isinstance(where, str):
        return f"{url!r} {where}"
    _, host, _ = where
    patterns = _matching(url, cfg)
    if not patterns:
        listed = ", ".join(cfg.allow) if cfg.allow else "nothing is listed"
        return f"{url!r} is not in [webhooks] allow ({listed})"
    local_name = host == "localhost" or host.endswith(".localhost")
    if (local_name or _internal(host)) and not any(_explicit(p, host) for p in patterns):
        return (f"{url!r} is a loopback, private or reserved address: [webhooks] allow must "
                f"name the host {host!r} explicitly (no wildcard) to allow it")
    return None


async def refusal(url: str, cfg: WebhooksConfig) -> str | None:
    """:func:`literal_refusal`, then every address the host resolves to is judged too.

    A name that does not resolve raises :class:`OSError` (the caller retries: DNS can be
    down for a moment)."""
    found = literal_refusal(url, cfg)
    if found is not None:
        return found
    where = _host(url)
    assert not isinstance(where, str)  # literal_refusal judged it
    _, host, port = where
    if any(_explicit(p, host) for p in _matching(url, cfg)):
        return None  # named explicitly: whatever it resolves to is what the operator meant
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for info in infos:
        address = str(info[4][0])
        if _internal(address):
            return (f"{url!r}: host {host!r} resolves to {address}, a loopback, private or "
                    "reserved address that [webhooks] allow does not name explicitly")
    return None


def address_refusal(cfg: WebhooksConfig) -> Callable[[str, str], str | None]:
    """Judge, at connect time, one address ``host`` resolved to (see
    :mod:`segflowd.delivery.pinned`): an internal one only for a host an allow pattern
    names explicitly."""
    def refuse(host: str, address: str) -> str | None:
        if not _internal(address) or any(_explicit(p, host) for p in cfg.allow):
            return None
        return (f"host {host!r} resolves to {address}, a loopback, private or reserved "
                "address that [webhooks] allow does not name explicitly")
    return refuse


def secret_headers(url: str, cfg: WebhooksConfig) -> dict[str, str]:
    """The configured headers of every ``[webhooks.headers."PATTERN"]`` matching ``url``."""
    out: dict[str, str] = {}
    for h in cfg.headers:
        if _fits(url, h.pattern):
            out.update(dict(h.headers))
    return out


def parse_retry_after(value: str | None, now: dt.datetime) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP-date; ``now`` is naive UTC)."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # "²".isdigit() too: not a number of seconds
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return max(0.0, (when - now).total_seconds())


def backoff(attempt: int, retry_after: float | None, cfg: WebhooksConfig,
            rng: random.Random) -> float:
    """Seconds before attempt ``attempt + 1``: what the receiver asked for, else
    exponential from ``retry_base`` with jitter (50-100 %); never over ``retry_max``."""
    if retry_after is not None:
        return min(cfg.retry_max, max(0.0, retry_after))
    base = min(cfg.retry_max, cfg.retry_base * 2.0 ** max(0, attempt - 1))
    return base * (0.5 + rng.random() / 2)


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR - 1] + "…"


async def call(client: httpx.AsyncClient, request: Mapping[str, object], *, key: str,
               cfg: WebhooksConfig, now: dt.datetime) -> Outcome:
    """One attempt at the call ``request`` (a webhook message's ``data``: url, method,
    json, headers, timeout), with ``Idempotency-Key: key``."""
    url = str(request.get("url") or "")
    timeout = request.get("timeout")
    seconds = float(timeout) if isinstance(timeout, int | float) else 10.0
    try:
        with anyio.fail_after(seconds):  # a slow resolver is bounded as the call is
            refused = await refusal(url, cfg)
    except TimeoutError:
        return Outcome("retry", error=_short(f"{url}: its host did not resolve within "
                                             f"{seconds:g} s"))
    except OSError as exc:
        return Outcome("retry", error=_short(f"{url}: cannot resolve its host: {exc}"))
    if refused is not None:
        return Outcome("refused", error=_short(f"refused: {refused}"))
    method = str(request.get("method") or "POST")
    flow_headers = request.get("headers")
    headers = {str(k): str(v) for k, v in (
        flow_headers.items() if isinstance(flow_headers, dict) else ())}
    headers.update(secret_headers(url, cfg))
    for name in [h for h in headers if h.lower() == "idempotency-key"]:
        del headers[name]  # the step's key, whatever the flow wrote
    headers["Idempotency-Key"] = key
    # Bytes as sent: the cap counts what arrives, never a compressed body's expansion.
    headers.setdefault("Accept-Encoding", "identity")
    body = request.get("json")
    content = None if body is None else json.dumps(body, separators=(",", ":")).encode()
    if content is not None:
        headers.setdefault("Content-Type", "application/json")
    try:
        with anyio.fail_after(seconds):
            async with client.stream(method, url, headers=headers, content=content,
                                     timeout=seconds) as resp:
                chunks: list[bytes] = []
                size, truncated = 0, False
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > cfg.max_body:
                        truncated = True
                        break
                    chunks.append(chunk)
    except RefusedAddress as exc:  # the name changed its answer since refusal() judged it
        return Outcome("refused", error=_short(f"refused: {url!r}: {exc}"))
    except TimeoutError:
        return Outcome("retry", error=_short(f"{method} {url}: no answer within {seconds:g} s"))
    except httpx.HTTPError as exc:
        return Outcome("retry", error=_short(f"{method} {url}: {type(exc).__name__}: {exc}"))
    except OSError as exc:
        return Outcome("retry", error=_short(f"{method} {url}: {exc}"))
    answer: dict[str, str] = {}
    for name, value in resp.headers.multi_items():
        name = name.lower()
        answer[name] = f"{answer[name]}, {value}" if name in answer else value
    parsed: object = None
    if not truncated:
        try:  # NaN and Infinity are not JSON (the store's JSON refuses them)
            parsed = json.loads(b"".join(chunks), parse_constant=_not_json)
        except (ValueError, RecursionError):  # RecursionError: [[[...]]] nested too deep
            parsed = None
    if resp.status_code >= 500 or resp.status_code == 429:
        return Outcome("retry", error=f"{method} {url}: HTTP {resp.status_code}",
                       retry_after=parse_retry_after(resp.headers.get("retry-after"), now))
    return Outcome("answered", response={"status": resp.status_code, "headers": answer,
                                         "json": parsed, "truncated": truncated})


def _not_json(name: str) -> object:
    raise ValueError(f"{name} is not JSON")
