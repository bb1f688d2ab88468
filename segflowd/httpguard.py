"""The HTTP connection protocol: uvicorn's httptools protocol, guarded against slow clients.

uvicorn bounds only the wait between two requests of a kept-alive connection. A client
that connects and sends nothing, sends its headers a byte at a time (slowloris) or
stalls in its body holds a connection, and a file descriptor, for good; enough of them
and the daemon cannot accept anyone. Here every connection is always under one of
three bounds, and the number of connections under one cap:

* ``header_timeout``: from connecting, or from the first byte after a response, to the
  end of the request's headers. Passed with part of a request received: 408 and close;
  with nothing received: closed quietly (an idle connection).
* ``body_timeout``: from the end of the headers to the body's last byte. Passed: 408
  (if no answer started) and close; the handler sees the client gone.
* ``keepalive_timeout``: uvicorn's own, between a response and the next request's first
  byte.
* ``max_connections``: a connection past it first closes an idle connection (no
  request running on it: waiting for a request, or in its headers), the one nearest
  its own bound (with equal bounds, the one idle the longest), so idle sockets never
  lock out a real client; only when every connection is running a request is the
  newcomer answered 503 with ``Retry-After`` and closed.

Per request, the guard adds three callbacks to uvicorn's parser (``data_received``,
``on_message_begin``, ``on_headers_complete``) and no timer for a request that arrives
whole: what the bounds cost is measured by ``bench/bounds.py``.
* ``max_header_bytes`` and ``max_headers``: request line and headers past either are
  answered 431 and the connection closed, before any handler runs.

Rejections are the daemon's JSON errors (``{"code", "message", "error": {"code",
"message"}}``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import resource
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

__all__ = ["HttpLimits", "connection_cap", "guarded_protocol"]

FD_RESERVE = 128  # file descriptors kept for the store pool, SMTP, sources, logs, sockets
RETRY_AFTER = 1  # seconds a client refused for lack of connections should wait


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """The ``[http]`` bounds of :mod:`segflowd.httpguard` (seconds and counts)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    max_connections: int = 1000
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100


def connection_cap(configured: int) -> int:
    """``configured``, lowered to leave :data:`FD_RESERVE` of the open-files limit free.

    Past that limit ``accept()`` fails and every new client, real or not, is dropped.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - FD_RESERVE))


class _Shared:
    """The state the connections of one server share."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.open: set[GuardedProtocol] = set()  # not yet closed by us or the client


class _LimitExceeded(Exception):
    """Raised in a parser callback to stop parsing; answered by send_400_response()."""


class GuardedProtocol(HttpToolsProtocol):
    """One HTTP connection (see the module docstring). Made by :func:`guarded_protocol`."""

    shared: ClassVar[_Shared]

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = self.shared.limits
        # uvicorn's keep-alive timer goes to loop.call_later, which takes any seconds.
        self.timeout_keep_alive = limits.keepalive_timeout  # type: ignore[assignment]  # reason: float seconds
        self._timer: asyncio.TimerHandle | None = None  # the header or body bound
        self._in_headers = False  # between a request's first byte and its headers' end
        self._awaiting_body = False  # between a request's headers' end and its last byte
        self._raw = 0  # bytes of chunks that fell wholly in the header phase
        self._chunk = 0  # bytes of the chunk being parsed
        self._span = 0  # bytes received since the last head ended (the current chunk whole)
        self._requests = 0  # headers completed on this connection
        self._rejection: tuple[int, str, str] | None = None

    # -- connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # reason: as uvicorn's
        super().connection_made(transport)
        shared = self.shared
        shared.open.add(self)
        self._arm(shared.limits.header_timeout, self._header_timeout)
        if len(shared.open) > shared.limits.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def _make_room(self) -> None:
        # The idle connection nearest its own closing (its keep-alive or header bound)
        # goes: with equal bounds, the one idle the longest. Found here, by a scan, only
        # when the cap is reached, rather than kept in order on every request.
        victim, soonest = None, float("inf")
        for other in self.shared.open:
            if other is not self:
                deadline = other._idle_deadline()
                if deadline is not None and deadline < soonest:
                    victim, soonest = other, deadline
        if victim is not None:
            victim._close()
            return
        self._reject(503, "overloaded", "too many connections; retry later",
                     {"retry-after": str(RETRY_AFTER)})

    def _idle_deadline(self) -> float | None:
        """When a connection with no request running (waiting for one, or in its
        headers) would be closed by its own bound; None while a request runs on it."""
        cycle = self.cycle
        if self._awaiting_body or self.pipeline or not (
                cycle is None or cycle.response_complete):
            return None
        times = [t.when() for t in (self.timeout_keep_alive_task, self._timer)
                 if t is not None]
        return min(times) if times else float("inf")

    def _forget(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.shared.open.discard(self)

    def _close(self) -> None:
        self._forget()
        if not self.transport.is_closing():
            self.transport.close()

    def _reject(self, status: int, code: str, message: str,
                headers: dict[str, str] | None = None) -> None:
        """Answer ``status`` with a JSON error and close (no handler answers after it)."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the handler's answer, if any, goes nowhere
        if not self.transport.is_closing():
            body = json.dumps({"code": code, "message": message,
                               "error": {"code": code, "message": message}}).encode()
            head = [f"HTTP/1.1 {status} {_REASONS[status]}", "content-type: application/json",
                    f"content-length: {len(body)}", "connection: close",
                    *(f"{k}: {v}" for k, v in (headers or {}).items())]
            self.transport.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
        self._close()

    # -- bounds ----------------------------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, callback)

    def _header_timeout(self) -> None:
        self._timer = None
        if self._in_headers:
            seconds = self.shared.limits.header_timeout
            self._reject(408, "timeout", f"request headers not received within {seconds:g} s")
        else:
            self._close()  # nothing of a request came: an idle connection

    def _body_timeout(self) -> None:
        self._timer = None
        if self._awaiting_body and not self.cycle.response_started:
            seconds = self.shared.limits.body_timeout
            self._reject(408, "timeout", f"request body not received within {seconds:g} s")
        else:
            self._close()

    # -- parsing ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        began_in_headers, requests = self._in_headers, self._requests
        self._chunk = len(data)
        self._span += self._chunk
        super().data_received(data)
        if self.transport.is_closing():
            return
        # Timers are armed only when a chunk leaves a request unfinished: a request that
        # arrives whole (the usual case) costs none.
        if self._in_headers:
            if began_in_headers and requests == self._requests:
                # All of this chunk is header bytes the parser holds (a header line
                # without its end is not reported to on_header until complete).
                self._raw += len(data)
                if self._raw > self.shared.limits.max_header_bytes:
                    self._reject(*self._too_large())
                    return
            if self._timer is None:
                self._arm(self.shared.limits.header_timeout, self._header_timeout)
        elif self._awaiting_body:
            if not self.cycle.more_body:  # the body's last byte came (uvicorn's own flag:
                # no on_message_complete of ours, which would cost every request a call)
                self._awaiting_body = False
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            elif self._timer is None:
                self._arm(self.shared.limits.body_timeout, self._body_timeout)
        elif (self._timer is None and self.timeout_keep_alive_task is None
              and (self.cycle is None or self.cycle.response_complete)):
            # Blank lines between requests stopped uvicorn's keep-alive timer.
            self._arm(self.shared.limits.header_timeout, self._header_timeout)

    def send_400_response(self, msg: str) -> None:
        if self._rejection is not None:  # one of our limits stopped the parser
            self._reject(*self._rejection)
        else:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._raw = 0
        if self._awaiting_body:  # the last request's body ended in this chunk
            self._awaiting_body = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def on_headers_complete(self) -> None:
        # The caps are checked once the parser has the whole head, not per header line:
        # a callback of ours per line costs every request. What one head can hold before
        # then is bounded by the chunk read from the socket (and, across chunks, by _raw).
        limits = self.shared.limits
        if len(self.headers) > limits.max_headers:
            self._rejection = (431, "too_many_headers",
                               f"more than {limits.max_headers} header lines")
            raise _LimitExceeded
        # The head lies within the chunks received since the last head ended (_span, the
        # current chunk counted whole): when they are within the cap, so is the head (the
        # usual case: nothing to add up).
        if self._span > limits.max_header_bytes and (
                len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
                > limits.max_header_bytes):  # the request line and "name: value\r\n"s
            self._rejection = self._too_large()
            raise _LimitExceeded
        self._span = self._chunk  # a next head may begin in what is left of this chunk
        self._in_headers = False
        self._awaiting_body = True
        self._requests += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().on_headers_complete()

    def _too_large(self) -> tuple[int, str, str]:
        return (431, "headers_too_large", "request line and headers over "
                f"{self.shared.limits.max_header_bytes} bytes")


_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


def guarded_protocol(limits: HttpLimits) -> type[GuardedProtocol]:
    """The protocol class for one server (``uvicorn.Config(http=...)``): its connections
    share one cap and one idle list."""

    class Protocol(GuardedProtocol):
        shared = _Shared(limits)

    return Protocol
