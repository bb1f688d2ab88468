from __future__ import annotations

import gzip

import httpx
import pytest

from segflowd.http import Request, Response, Router, json_response

pytestmark = pytest.mark.anyio


def _echo_app() -> Router:
    router = Router()

    async def echo(request: Request) -> Response:
        return json_response({"id": request.params["id"], "body": (await request.body()).decode()})

    router.add("POST", "/v1/users/{id}/echo", echo)
    return router


async def _post(path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=_echo_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.post(path, content=body, headers=headers)


async def test_every_member_of_a_multi_member_gzip_body_is_read() -> None:
    body = gzip.compress(b'{"a":') + gzip.compress(b"1}")
    r = await _post("/v1/users/u1/echo", body, {"content-encoding": "gzip"})
    assert r.status_code == 200
    assert r.json()["body"] == '{"a":1}'


async def test_garbage_after_a_gzip_member_is_a_400_not_silently_dropped() -> None:
    body = gzip.compress(b"{}") + b"not gzip at all"
    r = await _post("/v1/users/u1/echo", body, {"content-encoding": "gzip"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_encoding"


async def test_percent_encoded_slash_stays_inside_its_path_parameter() -> None:
    r = await _post("/v1/users/team%2Falice/echo", b"x", {})
    assert r.status_code == 200
    assert r.json()["id"] == "team/alice"


async def test_unknown_route_is_a_json_404() -> None:
    r = await _post("/v1/nothing", b"x", {})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
