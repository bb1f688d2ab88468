"""segflowd.client against a fake transport: what it sends, how it reports errors."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from segflowd.client import BatchItem, SegflowAPIError, SegflowClient, SyncSegflowClient

pytestmark = pytest.mark.anyio


def handler(seen: list[httpx.Request]) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/events"):
            return httpx.Response(202, json={"id": 7, "duplicate": False})
        if request.method == "DELETE":
            return httpx.Response(200, json={"id": "u1", "deleted": True})
        if request.url.path == "/v1/users/missing":
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(answer)


async def test_async_client_sends_native_requests_with_bearer() -> None:
    seen: list[httpx.Request] = []
    async with SegflowClient("http://sf/", "k", transport=handler(seen)) as sf:
        await sf.create_user("a b/c", {"email": "x@example.com"})
        assert await sf.emit("u1", "login", {"ip": "1"}, id="e1") == 7
        assert await sf.delete_user("u1") is True
        with pytest.raises(SegflowAPIError) as info:
            await sf.get_user("missing")
    assert (info.value.status, info.value.code) == (404, "not_found")
    put, post = seen[0], seen[1]
    assert put.url.raw_path == b"/v1/users/a%20b%2Fc"
    assert put.headers["authorization"] == "Bearer k"
    assert json.loads(put.content) == {"attributes": {"email": "x@example.com"}}
    assert json.loads(post.content) == {"name": "login", "attributes": {"ip": "1"}, "id": "e1"}


def test_sync_batch_sends_segment_messages_with_basic_auth() -> None:
    seen: list[httpx.Request] = []
    with SyncSegflowClient("http://sf", "k", transport=handler(seen)) as sf:
        sf.batch([BatchItem("u1", attributes={"a": 1}), BatchItem("u1", name="e", id="m1")])
    (req,) = seen
    assert req.url.path == "/v1/batch"
    assert req.headers["authorization"] == "Basic " + base64.b64encode(b"k:").decode()
    items = json.loads(req.content)["batch"]
    assert [i["type"] for i in items] == ["identify", "track"]
    assert items[1]["messageId"] == "m1"
