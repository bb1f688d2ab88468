"""A small raw-ASGI toolkit: request, response, router, JSON errors. No framework.

Errors a handler raises become ``{"code", "message", "error": {"code", "message"}}``
with the right status: the nested object is the daemon's own shape, the top-level pair
is what Segment's SDKs read (they drop a 4xx only when they find ``code``). An
unexpected exception is logged with its traceback and answered 500 without one. A
request no route answers (404, 405) is reported to :attr:`Router.on_unrouted`.
Every response carries ``X-Content-Type-Options: nosniff``; an HTML one also carries the
headers of :data:`HTML_HEADERS` (no framing, no referrer, a CSP that allows only inline
styles and a form posting back to the daemon), unless its handler set them itself.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, unquote

import anyio
import anyio.lowlevel
import structlog

from . import strictjson
from .errors import StoreUnavailable

__all__ = [
    "HTML_HEADERS",
    "HTTPError",
    "Handler",
    "Request",
    "Response",
    "Router",
    "answer_error",
    "inflate",
    "json_response",
]

log = structlog.get_logger("segflowd.http")

RETRY_AFTER = 5  # seconds a client should wait when the store is unavailable
DEFAULT_BODY_LIMIT = 500 * 1024  # bytes
INFLATE_FIRST = 256  # bytes of a gzip member's input fed to zlib first; doubles from there
INFLATE_CHUNK = 64 * 1024  # bytes: the most compressed input fed to zlib at a time
INFLATE_YIELD_EVERY = 16  # inflate steps (chunks or gzip members) between event-loop turns
GZIP_MAGIC = b"\x1f\x8b"  # the first two bytes of every gzip member (RFC 1952)

# Every response: a browser never guesses another type than the one declared.
_ALL_HEADERS = {"X-Content-Type-Options": "nosniff"}
# Every HTML response (the unsubscribe pages): not framable (clickjacking a one-click
# unsubscribe button), no token leaking through Referer, nothing loaded or run but the
# page's own inline styles, and a form that may post only back here.
HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HTTPError(Exception):
    """Raised by a handler to answer ``status`` with a JSON error body."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


@dataclasses.dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    async def send(self, send: Send) -> None:
        raw = [(b"content-type", self.content_type.encode()),
               (b"content-length", str(len(self.body)).encode())]
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        given = {name for name, _ in raw}
        defaults = _ALL_HEADERS
        if self.content_type.split(";")[0].strip().lower() == "text/html":
            defaults = {**_ALL_HEADERS, **HTML_HEADERS}
        raw += [(name, v.encode("latin-1")) for k, v in defaults.items()
                if (name := k.lower().encode("latin-1")) not in given]
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        await send({"type": "http.response.body", "body": self.body})


# json.dumps with these options builds a new encoder per call; one instance does the same.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def json_response(
    obj: object, status: int = 200, headers: Mapping[str, str] | None = None,
) -> Response:
    body = _ENCODER.encode(obj).encode()
    return Response(status=status, body=body, headers=dict(headers) if headers else {})


def error_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> Response:
    return json_response({"code": code, "message": message,
                          "error": {"code": code, "message": message}}, status, headers)


def answer_error(exc: Exception, method: str, path: str) -> Response:
    """The error response for what a handler raised (logged if it was unexpected)."""
    if isinstance(exc, HTTPError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, StoreUnavailable):
        return error_response(503, "store_unavailable", "the store is unavailable; retry later",
                              {"Retry-After": str(RETRY_AFTER)})
    log.error("http.unhandled", method=method, path=path, exc_info=exc)
    return error_response(500, "internal", "internal error; see the daemon's log")


class Request:
    """One HTTP request; the body is read on demand, bounded, gzip-aware."""

    def __init__(self, scope: Scope, receive: Receive, params: dict[str, str]) -> None:
        self.scope = scope
        self._receive = receive
        self.params = params
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
        }
        self._body: bytes | None = None

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.scope.get("query_string", b"").decode("latin-1"))

    @property
    def client(self) -> str:
        c = self.scope.get("client")
        return str(c[0]) if c else ""

    async def body(self, limit: int = DEFAULT_BODY_LIMIT, *, sniff_gzip: bool = False) -> bytes:
        """The body, decompressed if gzip/deflate; 413 past ``limit`` bytes either way.

        With ``sniff_gzip`` a body that starts with gzip's magic bytes is inflated even
        without ``Content-Encoding`` (RudderStack's Node SDK sends it so). JSON never
        starts with those bytes, so nothing else is mistaken for gzip.
        """
        if self._body is not None:
            return self._body
        declared = self.headers.get("content-length")
        # isascii(): "²" (latin-1 0xB2) is a digit to str.isdigit() but not to int().
        if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, "too_large", f"request body over {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "disconnected", "client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, "too_large", f"request body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        encoding = self.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "deflate", "x-gzip"):
            raw = await inflate(raw, limit, gzip=encoding != "deflate")
        elif sniff_gzip and raw.startswith(GZIP_MAGIC) and encoding in ("identity", ""):
            raw = await inflate(raw, limit, gzip=True)
        elif encoding not in ("identity", ""):
            raise HTTPError(415, "unsupported_encoding",
                            f"Content-Encoding {encoding!r} is not supported (use gzip)")
        self._body = raw
        return raw

    async def json(self, limit: int = DEFAULT_BODY_LIMIT, *, any_type: bool = False) -> Any:
        """The body parsed as JSON; 400 naming the problem if it is not.

        Without ``any_type`` a Content-Type other than JSON or text/plain is a 415; with
        it (the Segment routes, whose SDKs label JSON in many ways) the body is read as
        JSON whatever its label, and gzip is recognised by its magic bytes too.
        """
        ctype = self.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if not any_type and ctype and ctype not in (
                "application/json", "text/plain", "application/x-json") \
                and not ctype.endswith("+json"):
            raise HTTPError(415, "unsupported_media_type",
                            f"Content-Type {ctype!r} is not supported: send application/json")
        raw = await self.body(limit, sniff_gzip=any_type)
        if not raw.strip():
            raise HTTPError(400, "invalid_json", "request body is empty: expected a JSON object")
        try:
            return strictjson.loads(raw)
        except UnicodeDecodeError:
            raise HTTPError(400, "invalid_json", "request body is not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise HTTPError(400, "invalid_json",
                            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                            f"column {exc.colno}") from None
        except ValueError as exc:  # NaN, Infinity, 1e400, a lone surrogate, a huge integer
            raise HTTPError(400, "invalid_json",
                            f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise HTTPError(400, "invalid_json",
                            "request body is not valid JSON: nested too deeply") from None


async def inflate(raw: bytes, limit: int, *, gzip: bool) -> bytes:
    """Decompress within ``limit``; every member of a multi-member gzip body counts.

    Linear in the body's size: each member's input is fed to zlib in chunks growing from
    ``INFLATE_FIRST`` to ``INFLATE_CHUNK`` bytes, so what zlib copies aside at a member's
    end is one small chunk, never the rest of the body; the output grows in one buffer;
    the event loop gets a turn every few steps. 413 as soon as the output passes
    ``limit``; 400 for a body that is not valid or is truncated.
    """
    out = bytearray()
    view = memoryview(raw)
    pos = steps = 0
    while True:  # one member
        d = zlib.decompressobj(wbits=(16 + zlib.MAX_WBITS) if gzip else zlib.MAX_WBITS)
        size = INFLATE_FIRST
        while not d.eof:
            if pos >= len(view):
                raise HTTPError(400, "invalid_encoding", "request body is truncated gzip")
            chunk = view[pos:pos + size]
            pos += len(chunk)
            size = min(2 * size, INFLATE_CHUNK)
            try:
                out += d.decompress(chunk, limit + 1 - len(out))
            except zlib.error:
                raise HTTPError(400, "invalid_encoding",
                                "request body is not valid gzip") from None
            # Output stops at limit + 1 bytes; input left unread (unconsumed_tail) means
            # it stopped there.
            if len(out) > limit or d.unconsumed_tail:
                raise HTTPError(413, "too_large",
                                f"decompressed request body over {limit} bytes")
            steps += 1
            if steps % INFLATE_YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
        pos -= len(d.unused_data)  # within the last chunk: what follows this member
        if pos >= len(view) or (view[pos] == 0 and not bytes(view[pos:]).strip(b"\0")):
            return bytes(out)  # padding after the last member is allowed (RFC 1952)
        if not gzip:
            raise HTTPError(400, "invalid_encoding", "request body has data after deflate end")
        steps += 1
        if steps % INFLATE_YIELD_EVERY == 0:
            await anyio.lowlevel.checkpoint()


Handler = Callable[[Request], Awaitable[Response]]


@dataclasses.dataclass
class _Route:
    pattern: re.Pattern[str]
    template: str
    handlers: dict[str, Handler]


class Router:
    """Routes ``METHOD /path/{param}`` to handlers; itself the ASGI application."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []
        # Called with (path, status) for a request no route answers (404 or 405).
        self.on_unrouted: Callable[[str, int], None] | None = None

    def add(self, method: str, template: str, handler: Handler) -> None:
        for route in self._routes:
            if route.template == template:
                if method in route.handlers:
                    raise ValueError(f"route {method} {template} is already registered")
                route.handlers[method] = handler
                return
        regex = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
        self._routes.append(_Route(re.compile(regex), template, {method: handler}))

    def route(self, method: str, template: str) -> Callable[[Handler], Handler]:
        def decorator(fn: Handler) -> Handler:
            self.add(method, template, fn)
            return fn
        return decorator

    def routes(self) -> list[tuple[str, str]]:
        return [(m, r.template) for r in self._routes for m in r.handlers]

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        for route in self._routes:
            m = route.pattern.match(path)
            if m is None:
                continue
            handler = route.handlers.get(method)
            if handler is None and method == "HEAD":
                handler = route.handlers.get("GET")
            if handler is None:
                allow = ", ".join(sorted(route.handlers))
                raise HTTPError(405, "method_not_allowed",
                                f"{method} is not allowed on {route.template}", {"Allow": allow})
            return handler, {k: unquote(v) for k, v in m.groupdict().items()}
        raise HTTPError(404, "not_found", f"no route {unquote(path)}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets are not served
            return
        try:
            # Match on the raw, still percent-encoded path, so "%2F" in a user id stays
            # inside its path parameter instead of splitting it.
            raw_path = scope.get("raw_path")
            path = raw_path.decode("latin-1") if raw_path else scope["path"]
            try:
                handler, params = self.resolve(scope["method"], path)
            except HTTPError as exc:
                if self.on_unrouted is not None:
                    self.on_unrouted(path, exc.status)
                raise
            response = await handler(Request(scope, receive, params))
        except Exception as exc:
            response = answer_error(exc, scope.get("method", ""), scope.get("path", ""))
        await response.send(send)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
