"""segflowd.client against a fake transport: what it sends, how it reports errors."""

from __future__ import annotations

import base64
import datetime as dt
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


@pytest.mark.parametrize(("given", "sent"), [
    ("2026-03-01T09:00:00Z", "2026-03-01T09:00:00+00:00"),
    ("2026-03-01T10:00:00+01:00", "2026-03-01T10:00:00+01:00"),
    ("2026-03-01T09:00:00", "2026-03-01T09:00:00Z"),  # no offset: UTC
    (dt.datetime(2026, 3, 1, 9, 0), "2026-03-01T09:00:00Z"),  # naive: UTC
    (dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC), "2026-03-01T09:00:00+00:00"),
])
async def test_emit_takes_iso_strings_and_datetimes(given: object, sent: str) -> None:
    seen: list[httpx.Request] = []
    async with SegflowClient("http://sf", "k", transport=handler(seen)) as sf:
        await sf.emit("u1", "login", timestamp=given)  # type: ignore[arg-type]
    with SyncSegflowClient("http://sf", "k", transport=handler(seen)) as sync:
        sync.emit("u1", "login", timestamp=given)  # type: ignore[arg-type]
        sync.batch([BatchItem("u1", name="login", timestamp=given)])  # type: ignore[arg-type]
    assert [json.loads(r.content)["timestamp"] for r in seen[:2]] == [sent, sent]
    assert json.loads(seen[2].content)["batch"][0]["timestamp"] == sent


@pytest.mark.parametrize("given", [1772355600, 1772355600.0, dt.date(2026, 3, 1), b"2026"])
def test_a_timestamp_of_another_type_is_a_clear_type_error(given: object) -> None:
    seen: list[httpx.Request] = []
    with SyncSegflowClient("http://sf", "k", transport=handler(seen)) as sf:
        with pytest.raises(TypeError, match="timestamp must be a datetime or an ISO-8601 "
                                            "string, not "):
            sf.emit("u1", "login", timestamp=given)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="timestamp must be"):
            BatchItem("u1", name="login", timestamp=given)  # type: ignore[arg-type]
    assert seen == []  # nothing was sent


def test_a_string_that_is_no_time_is_a_value_error_naming_it() -> None:
    with SyncSegflowClient("http://sf", "k", transport=handler([])) as sf, \
            pytest.raises(ValueError, match="timestamp 'yesterday' is not an ISO-8601"):
        sf.emit("u1", "login", timestamp="yesterday")
