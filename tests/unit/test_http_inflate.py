"""Gzip and deflate request bodies: linear inflation in bounded chunks, within the limit."""

from __future__ import annotations

import gzip
import types
import zlib
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from segflowd import http
from segflowd.http import Request, Response, Router, json_response

pytestmark = pytest.mark.anyio

LIMIT = 256 * 1024  # bytes: the echo route's body limit
MEMBERS = 4000


def _echo_app() -> Router:
    router = Router()

    async def echo(request: Request) -> Response:
        body = await request.body(LIMIT)
        return json_response({"size": len(body), "head": body[:16].decode(),
                              "tail": body[-16:].decode()})

    router.add("POST", "/echo", echo)
    return router


async def _post(body: bytes, encoding: str = "gzip") -> httpx.Response:
    transport = httpx.ASGITransport(app=_echo_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.post("/echo", content=body, headers={"content-encoding": encoding})


def _members(n: int, piece: bytes) -> bytes:
    return b"".join(gzip.compress(piece) for _ in range(n))


async def test_a_many_member_gzip_body_within_the_limit_is_inflated_whole() -> None:
    pieces = [f"{i:015d}|".encode() + b"a" * 48 for i in range(MEMBERS)]  # 64 bytes each
    body = b"".join(gzip.compress(p) for p in pieces)
    assert len(body) < LIMIT
    r = await _post(body)
    assert r.status_code == 200
    assert r.json() == {"size": 64 * MEMBERS, "head": pieces[0][:16].decode(),
                        "tail": pieces[-1][-16:].decode()}


async def test_a_many_member_gzip_body_past_the_limit_is_413() -> None:
    body = _members(LIMIT // 64 + 1, b"x" * 64)  # one member more than fits
    assert len(body) < LIMIT  # the compressed body itself is within the limit
    r = await _post(body)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_large"


async def test_one_member_that_inflates_past_the_limit_is_413() -> None:
    r = await _post(gzip.compress(b"{" * (LIMIT + 1)))
    assert r.status_code == 413


async def test_a_body_exactly_at_the_limit_is_accepted() -> None:
    r = await _post(_members(LIMIT // 64, b"y" * 64))
    assert r.status_code == 200
    assert r.json()["size"] == LIMIT


async def test_padding_after_the_last_member_is_allowed_and_truncation_is_400() -> None:
    ok = await _post(gzip.compress(b"abc") + b"\0" * 100)
    assert ok.status_code == 200
    assert ok.json()["size"] == 3
    cut = await _post(gzip.compress(b"abc" * 100)[:-6])
    assert cut.status_code == 400
    assert cut.json()["error"]["code"] == "invalid_encoding"


async def test_deflate_bodies_and_data_after_their_end() -> None:
    ok = await _post(zlib.compress(b"hello"), "deflate")
    assert ok.json()["size"] == 5
    bad = await _post(zlib.compress(b"hello") + zlib.compress(b"again"), "deflate")
    assert bad.status_code == 400


async def test_zlib_is_fed_each_input_byte_once_in_bounded_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear: a member's leftover is never the whole rest of the body copied again."""
    fed: list[int] = []

    class Counting:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._d = zlib.decompressobj(*args, **kwargs)

        def decompress(self, data: Any, max_length: int = 0) -> bytes:
            fed.append(len(data))
            return self._d.decompress(data, max_length)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._d, name)

    shim = types.SimpleNamespace(**{k: getattr(zlib, k) for k in dir(zlib)
                                    if not k.startswith("__")})
    shim.decompressobj = Counting
    monkeypatch.setattr(http, "zlib", shim)
    body = _members(MEMBERS, b"z" * 64)
    r = await _post(body)
    assert r.status_code == 200
    assert r.json()["size"] == 64 * MEMBERS
    assert max(fed) <= http.INFLATE_CHUNK
    # every byte about once, plus a first chunk per member (the old way fed each member
    # the whole rest of the body: len(body) * MEMBERS / 2 bytes in all)
    assert sum(fed) <= 2 * len(body) + MEMBERS * http.INFLATE_FIRST


async def test_inflating_a_big_body_gives_the_event_loop_turns() -> None:
    body = _members(MEMBERS, b"w" * 64)
    ticks = 0
    at_receive = -1

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.lowlevel.checkpoint()
            ticks += 1

    async def receive() -> dict[str, Any]:
        nonlocal at_receive
        at_receive = ticks
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/echo", "query_string": b"",
             "headers": [(b"content-encoding", b"gzip")]}
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        raw = await Request(scope, receive, {}).body(LIMIT)
        tg.cancel_scope.cancel()
    assert len(raw) == 64 * MEMBERS
    assert ticks > at_receive  # other tasks ran while it inflated
