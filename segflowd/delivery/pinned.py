"""Outcalls connect to the address that was judged, never to a second resolution of it.

:func:`segflowd.delivery.outcalls.refusal` resolves a webhook's host and refuses a name
that points into the machine's own network; but httpx would resolve the name again to
connect, and a name whose DNS answer changes between the two (a rebinding attack: a
public address first, 127.0.0.1 a moment later, TTL 0) would reach loopback after all.
:class:`PinnedBackend`, the network backend of the outcall client, resolves once, judges
every address of that answer and connects to those addresses themselves. TLS still
verifies the certificate against the host name: httpcore takes the server name from the
URL, not from the address the socket connected to.
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Callable, Iterable

import anyio
import httpcore
import httpx

__all__ = ["SHARD", "PinnedBackend", "RefusedAddress", "pinned_transport",
           "sharded_transport"]


class RefusedAddress(Exception):
    """The host resolved, at connect time, to an address the allow-list does not allow."""


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects to the addresses of one resolution, each judged by ``refuse(host, address)``
    (a reason to refuse, or None)."""

    def __init__(self, refuse: Callable[[str, str], str | None],
                 inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._refuse = refuse
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} took over {timeout} s") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:  # every one judged first: no address is tried unjudged
            reason = self._refuse(host, address)
            if reason is not None:
                raise RefusedAddress(reason)
        if not addresses:
            raise httpcore.ConnectError(f"{host!r} resolved to no address")
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout,
                                                     local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("outcalls connect over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


SHARD = 4  # connections per pool: httpcore scans a whole pool for every request


class _Sharded(httpx.AsyncBaseTransport):
    """Each request goes to the pool with the fewest calls in flight (until its answer is
    closed). httpcore's pool looks at every one of its connections (a poll of each idle
    socket) to place each request, so one pool of 64 costs several times the CPU per call
    of sixteen pools of 4 (bench/channels.py)."""

    def __init__(self, shards: list[httpx.AsyncHTTPTransport]) -> None:
        self._shards = shards
        self._busy = [0] * len(shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        i = min(range(len(self._shards)), key=self._busy.__getitem__)
        self._busy[i] += 1
        try:
            response = await self._shards[i].handle_async_request(request)
        except BaseException:
            self._busy[i] -= 1
            raise
        response.stream = _Counted(response.stream, self._busy, i)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class _Counted(httpx.AsyncByteStream):
    """An answer's body that frees its pool's place in :class:`_Sharded` when closed."""

    def __init__(self, inner: object, busy: list[int], i: int) -> None:
        assert isinstance(inner, httpx.AsyncByteStream)
        self._inner, self._busy, self._i, self._open = inner, busy, i, True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._busy[self._i] -= 1
        await self._inner.aclose()


def pinned_transport(refuse: Callable[[str, str], str | None], *,
                     limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """An httpx transport whose connections go through a :class:`PinnedBackend` (and
    never through a proxy: the allow-list judges where calls go), in pools of at most
    :data:`SHARD` connections."""
    return sharded_transport(limits, PinnedBackend(refuse))


def sharded_transport(limits: httpx.Limits,
                      backend: httpcore.AsyncNetworkBackend | None = None
                      ) -> httpx.AsyncBaseTransport:
    """An httpx transport (no proxy from the environment) of ``limits``, its connections
    in pools of at most :data:`SHARD`, each call to the pool with the fewest in flight."""
    total = limits.max_connections or SHARD
    count = max(1, math.ceil(total / SHARD))
    keep = limits.max_keepalive_connections
    shards = []
    for i in range(count):
        size = total // count + (1 if i < total % count else 0)
        transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
        # httpx takes no network backend; its pool, rebuilt with the same settings, does.
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=size,
            max_keepalive_connections=None if keep is None else min(size, keep),
            keepalive_expiry=limits.keepalive_expiry, http1=True, http2=False,
            network_backend=backend)
        shards.append(transport)
    return shards[0] if count == 1 else _Sharded(shards)
