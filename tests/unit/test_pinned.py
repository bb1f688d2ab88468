"""PinnedBackend: one resolution, every address judged, connections to those addresses."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpcore
import httpx
import pytest

from segflowd.delivery.pinned import PinnedBackend, RefusedAddress

pytestmark = pytest.mark.anyio


class Inner(httpcore.AsyncNetworkBackend):
    """Records where it was asked to connect; refuses the addresses in ``down``."""

    def __init__(self, down: frozenset[str] = frozenset()) -> None:
        self.asked: list[str] = []
        self.down = down

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None, socket_options: Any = None
                          ) -> httpcore.AsyncNetworkStream:
        self.asked.append(host)
        if host in self.down:
            raise httpcore.ConnectError(f"{host} is down")
        return httpcore.AsyncMockStream([])

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


def answers(monkeypatch: pytest.MonkeyPatch, addresses: list[str]) -> list[int]:
    calls: list[int] = []

    def getaddrinfo(name: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, int(port))) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


def no_loopback(host: str, address: str) -> str | None:
    return f"{host} -> {address}" if address.startswith("127.") else None


async def test_connects_to_the_resolved_address_not_the_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = answers(monkeypatch, ["93.184.216.34"])
    inner = Inner()
    await PinnedBackend(no_loopback, inner).connect_tcp("hook.example", 443)
    assert inner.asked == ["93.184.216.34"]
    assert len(calls) == 1


async def test_one_refused_address_refuses_the_name_before_any_connect(
        monkeypatch: pytest.MonkeyPatch) -> None:
    answers(monkeypatch, ["93.184.216.34", "127.0.0.1"])
    inner = Inner()
    with pytest.raises(RefusedAddress, match=r"127\.0\.0\.1"):
        await PinnedBackend(no_loopback, inner).connect_tcp("hook.example", 443)
    assert inner.asked == []


async def test_the_next_address_is_tried_when_one_is_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    answers(monkeypatch, ["2001:db8::1", "93.184.216.34", "93.184.216.34"])
    inner = Inner(down=frozenset({"2001:db8::1"}))
    await PinnedBackend(no_loopback, inner).connect_tcp("hook.example", 443)
    assert inner.asked == ["2001:db8::1", "93.184.216.34"]  # a repeated answer tried once


async def test_a_name_that_does_not_resolve_is_a_connect_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(httpcore.ConnectError, match="cannot resolve"):
        await PinnedBackend(no_loopback, Inner()).connect_tcp("nowhere.example", 443)


async def test_calls_spread_over_pools_by_calls_in_flight_and_free_them_when_closed() -> None:
    from segflowd.delivery.pinned import _Sharded

    seen: list[int] = []

    class Body(httpx.AsyncByteStream):  # an answer streamed, as a real pool's is
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"ok"

    def pool(i: int) -> httpx.MockTransport:
        def answer(request: httpx.Request) -> httpx.Response:
            seen.append(i)
            return httpx.Response(200, stream=Body())
        return httpx.MockTransport(answer)

    sharded = _Sharded([pool(0), pool(1), pool(2)])  # type: ignore[list-item]
    async with httpx.AsyncClient(transport=sharded) as client:
        streams = []
        for _ in range(3):  # three answers kept open: one on each pool
            streams.append(await client.send(client.build_request("GET", "http://h/"),
                                             stream=True))
        assert sorted(seen) == [0, 1, 2]
        await streams[1].aclose()  # pool 1 is free again: the next call goes there
        (await client.get("http://h/")).raise_for_status()
        assert seen[-1] == 1
        for s in streams:
            await s.aclose()
    assert sharded._busy == [0, 0, 0]
