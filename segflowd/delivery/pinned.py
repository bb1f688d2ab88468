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

import socket
from collections.abc import Callable, Iterable

import anyio
import httpcore
import httpx

__all__ = ["PinnedBackend", "RefusedAddress", "pinned_transport"]


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


def pinned_transport(refuse: Callable[[str, str], str | None], *,
                     limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections go through a :class:`PinnedBackend` (and
    never through a proxy: the allow-list judges where calls go)."""
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    # httpx takes no network backend; its pool, rebuilt with the same settings, does.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry, http1=True, http2=False,
        network_backend=PinnedBackend(refuse))
    return transport
