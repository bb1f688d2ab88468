"""The ingest ASGI app on a real store (SQLite and MariaDB), called through httpx.ASGITransport
with the group committer running."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
import sqlalchemy as sa

from segflowd import schema
from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.hooks import IngestBatch
from segflowd.http import Router
from segflowd.ingest.service import IngestService
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

SECRET = "s3cret-key"
OTHER = "other-secret"
NOW = dt.datetime(2026, 1, 2, 3, 4, 5)


class RecordingSink:
    def __init__(self) -> None:
        self.batches: list[IngestBatch] = []

    def ingested(self, batch: IngestBatch) -> None:
        self.batches.append(batch)


@dataclasses.dataclass
class Harness:
    http: httpx.AsyncClient
    store: Store
    sink: RecordingSink
    service: IngestService
    kernel: Kernel

    async def rows(self, table: sa.Table, *where: sa.ColumnElement[bool]) -> list[sa.Row[object]]:
        async with self.store.connect() as conn:
            return list(await conn.execute(sa.select(table).where(*where)))


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "segflow.toml"
    path.write_text(f"""
[daemon]
app = "app.py:app"
[http]
listen = "127.0.0.1:18787"
max_event_bytes = 2048
max_request_bytes = 8192
{extra}
[[http.keys]]
name = "site-a"
secret = "{SECRET}"
[[http.keys]]
name = "site-b"
secret = "{OTHER}"
[email]
provider = "outbox"
[providers.outbox]
plugin = "outbox"
""")
    return path


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(store, tmp_path) as running:
        yield running


@contextlib.asynccontextmanager
async def harness(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    config = load_config(write_config(tmp_path), environ={})
    kernel = Kernel(config=config, app=Segflow(), store=store, clock=FakeClock(NOW),
                    bus=Bus(), metrics=Metrics())
    sink = RecordingSink()
    service = IngestService(kernel, sinks=[sink])
    router = Router()
    service.register_routes(router)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        transport = httpx.ASGITransport(app=router)
        async with httpx.AsyncClient(transport=transport, base_url="http://segflow") as http:
            yield Harness(http, store, sink, service, kernel)
        await service.drain()


def bearer(secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def basic(user: str, password: str = "") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def error_of(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"code", "message", "error"}  # top level: what Segment's SDKs read
    assert (body["code"], body["message"]) == (body["error"]["code"], body["error"]["message"])
    return dict(body["error"])


# -- native API ----------------------------------------------------------------------


async def test_put_user_creates_then_merges_and_null_removes_a_key(h: Harness) -> None:
    r = await h.http.put("/v1/users/u1", headers=bearer(),
                         json={"attributes": {"email": "ann@example.com", "plan": "free"}})
    assert r.status_code == 200
    r = await h.http.put("/v1/users/u1", headers=bearer(),
                         json={"attributes": {"plan": None, "name": "Ann"}})
    assert r.status_code == 200
    (row,) = await h.rows(schema.users, schema.users.c.id == "u1")
    assert row.attributes == {"email": "ann@example.com", "name": "Ann"}
    assert row.email == "ann@example.com"
    assert row.created_at == NOW
    await h.http.put("/v1/users/u1", headers=bearer(), json={"attributes": {"email": None}})
    (row,) = await h.rows(schema.users, schema.users.c.id == "u1")
    assert row.email is None
    assert h.sink.batches[-1].users == frozenset({"u1"})


async def test_get_user_shows_attributes_segments_and_campaigns(h: Harness) -> None:
    await h.http.put("/v1/users/u1", headers=bearer(), json={"attributes": {"name": "Ann"}})
    async with h.store.begin() as conn:
        await conn.execute(sa.insert(schema.segment_members).values(
            segment="vip", user_id="u1", entered_at=NOW, evaluated_at=NOW))
        await conn.execute(sa.insert(schema.flow_instances).values(
            campaign="onboarding", user_id="u1", version="v1", status="waiting", live=1,
            created_at=NOW, updated_at=NOW))
    r = await h.http.get("/v1/users/u1", headers=bearer())
    assert r.status_code == 200
    body = r.json()
    assert body["attributes"] == {"name": "Ann"}
    assert [s["segment"] for s in body["segments"]] == ["vip"]
    assert [(c["campaign"], c["status"]) for c in body["campaigns"]] == [("onboarding",
                                                                          "waiting")]


async def test_get_unknown_user_is_404_json(h: Harness) -> None:
    r = await h.http.get("/v1/users/nobody", headers=bearer())
    assert r.status_code == 404
    assert error_of(r)["code"] == "not_found"


async def test_event_is_stored_with_client_time_in_utc_and_received_time(h: Harness) -> None:
    r = await h.http.post("/v1/users/u1/events", headers=bearer(), json={
        "name": "purchase", "attributes": {"amount": 42},
        "timestamp": "2025-12-31T23:30:00-02:00"})
    assert r.status_code == 202
    event_id = r.json()["id"]
    (row,) = await h.rows(schema.events)
    assert (row.id, row.user_id, row.name, row.attributes) == (event_id, "u1", "purchase",
                                                               {"amount": 42})
    assert row.created_at == dt.datetime(2026, 1, 1, 1, 30)
    assert row.received_at == NOW
    assert await h.rows(schema.users, schema.users.c.id == "u1")  # the user now exists
    batch = h.sink.batches[-1]
    assert [e.id for e in batch.events] == [event_id]
    published = [b for b in h.kernel.bus.recent if b.kind == "event.ingested"]
    assert [b.data["event_id"] for b in published] == [event_id]
    assert batch.users == frozenset({"u1"})


async def test_event_without_timestamp_takes_the_received_time(h: Harness) -> None:
    await h.http.post("/v1/users/u1/events", headers=bearer(), json={"name": "login"})
    (row,) = await h.rows(schema.events)
    assert row.created_at == NOW


async def test_same_event_id_twice_stores_one_row_and_succeeds_both_times(h: Harness) -> None:
    body = {"name": "purchase", "id": "order-1"}
    first = await h.http.post("/v1/users/u1/events", headers=bearer(), json=body)
    second = await h.http.post("/v1/users/u1/events", headers=bearer(), json=body)
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json() == {"id": first.json()["id"], "duplicate": False}
    assert second.json() == {"id": first.json()["id"], "duplicate": True}
    other_user = await h.http.post("/v1/users/u2/events", headers=bearer(), json=body)
    assert other_user.json()["duplicate"] is False
    assert len(await h.rows(schema.events)) == 2
    assert h.service.committer.statistics().duplicates == 1


async def test_duplicates_inside_one_flush_store_one_row(h: Harness) -> None:
    body = {"name": "purchase", "id": "same"}
    results = await asyncio.gather(*[
        h.http.post("/v1/users/u1/events", headers=bearer(), json=body) for _ in range(5)])
    assert {r.status_code for r in results} == {202}
    assert len({r.json()["id"] for r in results}) == 1
    assert len(await h.rows(schema.events)) == 1


async def test_concurrent_requests_are_group_committed(h: Harness) -> None:
    results = await asyncio.gather(*[
        h.http.post(f"/v1/users/u{i}/events", headers=bearer(), json={"name": "login"})
        for i in range(40)])
    assert {r.status_code for r in results} == {202}
    stats = h.service.committer.statistics()
    assert stats.flushes < 40
    assert stats.max_flush_rows > 1
    assert len(await h.rows(schema.events)) == 40
    assert h.service.statistics().requests == 40
    assert h.kernel.stats["ingest"]() == h.service.statistics()  # what the TUI reads
    assert h.kernel.metrics.value("segflow_ingest_events_total") == 40


async def test_delete_user_leaves_nothing_of_theirs_behind(h: Harness) -> None:
    await h.http.put("/v1/users/u1", headers=bearer(),
                     json={"attributes": {"email": "ann@example.com"}})
    await h.http.post("/v1/users/u1/events", headers=bearer(), json={"name": "login"})
    await h.http.post("/v1/track", headers=basic(SECRET),
                      json={"anonymousId": "a1", "event": "visit"})
    await h.http.post("/v1/identify", headers=basic(SECRET),
                      json={"userId": "u1", "anonymousId": "a1"})
    await h.http.put("/v1/users/u2", headers=bearer(), json={"attributes": {}})
    await h.http.post("/v1/users/u2/events", headers=bearer(), json={"name": "login"})
    s = schema
    async with h.store.begin() as conn:
        await conn.execute(sa.insert(s.segment_members).values(
            segment="vip", user_id="u1", entered_at=NOW, evaluated_at=NOW))
        await conn.execute(sa.insert(s.segment_changes).values(
            segment="vip", user_id="u1", entered=True, at=NOW))
        await conn.execute(sa.insert(s.subscriptions).values(
            user_id="u1", topic="marketing", updated_at=NOW))
        inst = (await conn.execute(sa.insert(s.flow_instances).values(
            campaign="onboarding", user_id="u1", version="v1", status="waiting", live=1,
            wake_at=NOW, created_at=NOW, updated_at=NOW))).inserted_primary_key[0]
        await conn.execute(sa.insert(s.flow_journal).values(
            instance_id=inst, seq=1, kind="send_email", name="welcome", args_hash="x",
            created_at=NOW))
        await conn.execute(sa.insert(s.messages).values(
            user_id="u1", kind="campaign", template="welcome", to_address="ann@example.com",
            data={"coupon": "X"}, status="sent", created_at=NOW, updated_at=NOW))
    r = await h.http.delete("/v1/users/u1", headers=bearer())
    assert r.status_code == 200
    assert r.json() == {"id": "u1", "deleted": True}
    for table in (s.users, s.events, s.segment_members, s.segment_changes, s.subscriptions,
                  s.anonymous_links):
        left = await h.rows(table, table.c.user_id == "u1" if "user_id" in table.c
                            else table.c.id == "u1")
        assert left == [], table.name
    assert await h.rows(s.events, s.events.c.anonymous_id == "a1") == []
    assert await h.rows(s.flow_journal) == []
    (inst_row,) = await h.rows(s.flow_instances)
    assert (inst_row.status, inst_row.live, inst_row.wake_at) == ("exited", None, None)
    (msg,) = await h.rows(s.messages)
    assert (msg.user_id, msg.to_address, msg.data) == (None, None, None)
    assert len(await h.rows(s.events, s.events.c.user_id == "u2")) == 1  # others untouched
    assert h.sink.batches[-1].deleted == frozenset({"u1"})
    again = await h.http.delete("/v1/users/u1", headers=bearer())
    assert again.json() == {"id": "u1", "deleted": False}


# -- auth ----------------------------------------------------------------------------


async def test_native_needs_a_valid_bearer_key(h: Harness) -> None:
    missing = await h.http.put("/v1/users/u1", json={"attributes": {}})
    wrong = await h.http.put("/v1/users/u1", headers=bearer("nope"), json={"attributes": {}})
    as_basic = await h.http.put("/v1/users/u1", headers=basic(SECRET), json={"attributes": {}})
    second_key = await h.http.put("/v1/users/u1", headers=bearer(OTHER),
                                  json={"attributes": {}})
    for r in (missing, wrong, as_basic):
        assert r.status_code == 401
        assert error_of(r)["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert second_key.status_code == 200
    assert len(await h.rows(schema.users)) == 1


async def test_segment_accepts_basic_secret_or_body_write_key(h: Harness) -> None:
    ok_basic = await h.http.post("/v1/track", headers=basic(SECRET),
                                 json={"userId": "u1", "event": "a"})
    ok_body = await h.http.post("/v1/track", json={"userId": "u1", "event": "b",
                                                   "writeKey": OTHER})
    bad_basic = await h.http.post("/v1/track", headers=basic("nope"),
                                  json={"userId": "u1", "event": "c", "writeKey": SECRET})
    bad_body = await h.http.post("/v1/track", json={"userId": "u1", "event": "d",
                                                    "writeKey": "nope"})
    none = await h.http.post("/v1/track", json={"userId": "u1", "event": "e"})
    assert (ok_basic.status_code, ok_body.status_code) == (200, 200)
    assert ok_basic.json() == {"success": True}
    for r in (bad_basic, bad_body, none):
        assert r.status_code == 401
        assert error_of(r)["code"] == "unauthorized"
    assert sorted(r.name for r in await h.rows(schema.events)) == ["a", "b"]


async def test_customerio_needs_key_name_as_site_id_and_secret_as_api_key(h: Harness) -> None:
    ok = await h.http.put("/api/v1/customers/u1", headers=basic("site-a", SECRET),
                          json={"email": "a@example.com"})
    wrong_pair = await h.http.put("/api/v1/customers/u1", headers=basic("site-a", OTHER),
                                  json={"email": "b@example.com"})
    wrong_site = await h.http.put("/api/v1/customers/u1", headers=basic("nope", SECRET),
                                  json={"email": "b@example.com"})
    bearer_only = await h.http.put("/api/v1/customers/u1", headers=bearer(),
                                   json={"email": "b@example.com"})
    assert ok.status_code == 200
    for r in (wrong_pair, wrong_site, bearer_only):
        assert r.status_code == 401
        assert error_of(r)["code"] == "unauthorized"
    (row,) = await h.rows(schema.users)
    assert row.email == "a@example.com"


# -- input errors --------------------------------------------------------------------


@pytest.mark.parametrize(("body", "field"), [
    ({"attributes": {}}, "name: is required"),
    ({"name": 5}, "name: must be a string"),
    ({"name": "x", "attributes": [1]}, "attributes: must be a JSON object"),
    ({"name": "x", "timestamp": "yesterday"}, "timestamp: is not an ISO 8601 time"),
    ({"name": "x", "id": {"a": 1}}, "id: must be a string"),
    ({"name": "x", "amount": 5}, "amount: is not a field of this request"),
    ([1, 2], "body: must be a JSON object"),
])
async def test_bad_event_is_400_naming_the_field(h: Harness, body: object, field: str) -> None:
    r = await h.http.post("/v1/users/u1/events", headers=bearer(), json=body)
    assert r.status_code == 400
    assert error_of(r)["message"].startswith(field)
    assert await h.rows(schema.events) == []


async def test_user_fields_at_the_top_level_are_400_pointing_at_attributes(h: Harness) -> None:
    r = await h.http.put("/v1/users/u1", headers=bearer(),
                         json={"email": "a@example.com", "name": "Ann"})
    assert r.status_code == 400
    message = error_of(r)["message"]
    assert message.startswith("email: is not a field of this request")
    assert '"attributes"' in message
    assert await h.rows(schema.users) == []


async def test_invalid_json_is_400(h: Harness) -> None:
    r = await h.http.post("/v1/users/u1/events", headers={**bearer(),
                          "Content-Type": "application/json"}, content=b"{nope")
    assert r.status_code == 400
    assert error_of(r)["code"] == "invalid_json"


async def test_non_json_content_type_is_415(h: Harness) -> None:
    r = await h.http.post("/v1/users/u1/events", headers=bearer(), data={"name": "x"})
    assert r.status_code == 415
    assert error_of(r)["code"] == "unsupported_media_type"


async def test_event_over_the_event_limit_is_413(h: Harness) -> None:
    r = await h.http.post("/v1/users/u1/events", headers=bearer(),
                          json={"name": "x", "attributes": {"blob": "x" * 3000}})
    assert r.status_code == 413
    assert "limit per event is 2048" in error_of(r)["message"]
    assert await h.rows(schema.events) == []


async def test_request_over_the_request_limit_is_413(h: Harness) -> None:
    batch = [{"type": "track", "userId": f"u{i}", "event": "e", "properties": {"p": "x" * 500}}
             for i in range(20)]
    r = await h.http.post("/v1/batch", headers=basic(SECRET), json={"batch": batch})
    assert r.status_code == 413
    assert error_of(r)["code"] == "too_large"
    assert await h.rows(schema.events) == []


async def test_gzip_body_is_accepted(h: Harness) -> None:
    raw = gzip.compress(json.dumps({"userId": "u1", "event": "zipped"}).encode())
    r = await h.http.post("/v1/track", headers={**basic(SECRET), "Content-Encoding": "gzip",
                                                 "Content-Type": "application/json"},
                          content=raw)
    assert r.status_code == 200
    (row,) = await h.rows(schema.events)
    assert row.name == "zipped"


async def test_gzip_that_inflates_past_the_limit_is_413(h: Harness) -> None:
    bomb = gzip.compress(json.dumps({"userId": "u1", "event": "x" * 100_000}).encode())
    assert len(bomb) < 8192
    r = await h.http.post("/v1/track", headers={**basic(SECRET), "Content-Encoding": "gzip",
                                                 "Content-Type": "application/json"},
                          content=bomb)
    assert r.status_code == 413
    assert "decompressed" in error_of(r)["message"]


async def test_unknown_route_is_404_and_wrong_method_is_405(h: Harness) -> None:
    router = Router()
    h.service.register_routes(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router),
                                 base_url="http://x") as http:
        missing = await http.get("/v1/nothing", headers=bearer())
        wrong = await http.get("/v1/track")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"
    assert wrong.status_code == 405
    assert error_of(wrong)["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "OPTIONS, POST"  # OPTIONS: the CORS preflight


async def test_store_down_is_503_with_retry_after_and_ingest_recovers(h: Harness) -> None:
    committer = h.service.committer
    real = committer.store
    down = Store.open("mysql+aiomysql://root@127.0.0.1:1/segflow", connect_timeout=1)
    committer.store = down
    try:
        r = await h.http.post("/v1/users/u1/events", headers=bearer(), json={"name": "lost"})
    finally:
        committer.store = real
        await down.close()
    assert r.status_code == 503
    assert error_of(r)["code"] == "store_unavailable"
    assert r.headers["retry-after"].isdigit()
    assert h.service.statistics().unavailable == 1
    ok = await h.http.post("/v1/users/u1/events", headers=bearer(), json={"name": "kept"})
    assert ok.status_code == 202
    assert [row.name for row in await h.rows(schema.events)] == ["kept"]


# -- Segment API ---------------------------------------------------------------------


async def test_segment_identify_track_page_screen_group_alias(h: Harness) -> None:
    auth = basic(SECRET)
    calls = [
        ("identify", {"userId": "u1", "traits": {"email": "ann@example.com", "plan": None}}),
        ("track", {"userId": "u1", "event": "signup", "properties": {"via": "ad"},
                   "timestamp": "2026-01-01T10:00:00+01:00", "messageId": "m1"}),
        ("page", {"userId": "u1", "name": "Home", "properties": {"url": "/"}}),
        ("screen", {"userId": "u1", "name": "Settings"}),
        ("group", {"userId": "u1", "groupId": "g1", "traits": {"name": "Acme"}}),
        ("alias", {"previousId": "anon-9", "userId": "u1"}),
    ]
    for kind, body in calls:
        r = await h.http.post(f"/v1/{kind}", headers=auth, json=body)
        assert r.status_code == 200, (kind, r.text)
    (user,) = await h.rows(schema.users)
    assert (user.id, user.email, user.attributes) == ("u1", "ann@example.com",
                                                      {"email": "ann@example.com"})
    events = {e.name: e for e in await h.rows(schema.events)}
    assert set(events) == {"signup", "$page", "$screen", "$group"}
    assert events["signup"].attributes == {"via": "ad"}
    assert events["signup"].created_at == dt.datetime(2026, 1, 1, 9, 0)
    assert events["$page"].attributes == {"name": "Home", "url": "/"}
    assert events["$group"].attributes == {"groupId": "g1", "traits": {"name": "Acme"}}
    (link,) = await h.rows(schema.anonymous_links)
    assert (link.anonymous_id, link.user_id) == ("anon-9", "u1")


async def test_segment_message_id_dedupes_and_is_namespaced_from_native_ids(h: Harness) -> None:
    body = {"userId": "u1", "event": "e", "messageId": "same"}
    for _ in range(2):
        assert (await h.http.post("/v1/track", headers=basic(SECRET), json=body)).is_success
    native = await h.http.post("/v1/users/u1/events", headers=bearer(),
                               json={"name": "e", "id": "same"})
    assert native.json()["duplicate"] is False
    assert len(await h.rows(schema.events)) == 2


async def test_segment_batch_merges_batch_context_into_items(h: Harness) -> None:
    body = {
        "batch": [
            {"type": "identify", "userId": "u1", "traits": {"name": "Ann"}},
            {"type": "track", "userId": "u1", "event": "a", "context": {"ip": "10.0.0.1"}},
            {"type": "track", "anonymousId": "x1", "event": "b"},
        ],
        "context": {"ip": "192.0.2.1", "library": {"name": "test"}},
        "writeKey": SECRET,
    }
    r = await h.http.post("/v1/batch", json=body)
    assert r.status_code == 200
    events = {e.name: e for e in await h.rows(schema.events)}
    assert events["a"].attributes["$context"] == {"ip": "10.0.0.1",
                                                  "library": {"name": "test"}}
    assert events["b"].attributes["$context"]["ip"] == "192.0.2.1"
    assert (events["b"].user_id, events["b"].anonymous_id) == (None, "x1")
    (user,) = await h.rows(schema.users)
    assert user.attributes == {"name": "Ann"}


async def test_bad_batch_item_is_400_naming_it_and_stores_nothing(h: Harness) -> None:
    body = {"batch": [{"type": "track", "userId": "u1", "event": "ok"},
                      {"type": "track", "userId": "u1"}]}
    r = await h.http.post("/v1/batch", headers=basic(SECRET), json=body)
    assert r.status_code == 400
    assert error_of(r)["message"].startswith("batch[1].event: is required")
    bad_type = await h.http.post("/v1/batch", headers=basic(SECRET),
                                 json={"batch": [{"type": "nope", "userId": "u1"}]})
    assert error_of(bad_type)["message"].startswith("batch[0].type")
    no_one = await h.http.post("/v1/track", headers=basic(SECRET), json={"event": "x"})
    assert error_of(no_one)["message"] == "body.userId: userId or anonymousId is required"
    assert await h.rows(schema.events) == []


async def test_anonymous_events_join_the_user_when_identify_links_them(h: Harness) -> None:
    auth = basic(SECRET)
    await h.http.post("/v1/track", headers=auth, json={"anonymousId": "a1", "event": "visit"})
    (before,) = await h.rows(schema.events)
    assert (before.user_id, before.anonymous_id) == (None, "a1")
    await h.http.post("/v1/identify", headers=auth,
                      json={"userId": "u1", "anonymousId": "a1", "traits": {}})
    (after,) = await h.rows(schema.events)
    assert after.user_id == "u1"
    assert "u1" in h.sink.batches[-1].users
    await h.http.post("/v1/track", headers=auth, json={"anonymousId": "a1", "event": "later"})
    later = (await h.rows(schema.events, schema.events.c.name == "later"))[0]
    assert later.user_id == "u1"


# -- Customer.io API -----------------------------------------------------------------


async def test_customerio_customer_event_anonymous_event_and_delete(h: Harness) -> None:
    auth = basic("site-a", SECRET)
    r = await h.http.put("/api/v1/customers/c1", headers=auth,
                         json={"email": "c@example.com", "created_at": 1700000000})
    assert (r.status_code, r.json()) == (200, {})
    r = await h.http.post("/api/v1/customers/c1/events", headers=auth, json={
        "name": "purchase", "data": {"amount": 5}, "timestamp": 1767225600, "id": "e1"})
    assert r.status_code == 200
    await h.http.post("/api/v1/customers/c1/events", headers=auth, json={
        "name": "purchase", "data": {"amount": 5}, "id": "e1"})
    await h.http.post("/api/v1/customers/c1/events", headers=auth,
                      json={"type": "page", "name": "https://example.com/", "data": {}})
    r = await h.http.post("/api/v1/events", headers=auth,
                          json={"name": "invite", "data": {}, "anonymous_id": "ca1"})
    assert r.status_code == 200
    rows = {e.name: e for e in await h.rows(schema.events)}
    assert len(await h.rows(schema.events)) == 3
    assert rows["purchase"].created_at == dt.datetime(2026, 1, 1)
    assert rows["$page"].attributes == {"url": "https://example.com/"}
    assert (rows["invite"].user_id, rows["invite"].anonymous_id) == (None, "ca1")
    (user,) = await h.rows(schema.users)
    assert user.email == "c@example.com"
    r = await h.http.delete("/api/v1/customers/c1", headers=auth)
    assert r.status_code == 200
    assert await h.rows(schema.users) == []
    assert await h.rows(schema.events, schema.events.c.user_id == "c1") == []


class TcpProxy:
    """Forwards a local port to the MariaDB server; ``cut()`` drops it like an outage."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._scope: anyio.CancelScope | None = None

    async def _pipe(self, src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                 anyio.ClosedResourceError):
            while True:
                await dst.send(await src.receive())

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp(*self.upstream) as server, \
                anyio.create_task_group() as tg:
            tg.start_soon(self._pipe, client, server)
            await self._pipe(server, client)
            tg.cancel_scope.cancel()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1",
                                                   local_port=self.port, reuse_port=False)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        with anyio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            await listener.serve(self._handle)
        await listener.aclose()

    def cut(self) -> None:
        assert self._scope is not None
        self._scope.cancel()


@pytest.mark.mariadb
async def test_mariadb_outage_is_503_nothing_written_and_ingest_recovers(
        mariadb_url: str, tmp_path: Path) -> None:
    real = sa.engine.make_url(mariadb_url)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 3306)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        store = Store.open(real.set(port=proxy.port).render_as_string(hide_password=False),
                           connect_timeout=2)
        await store.migrate()
        try:
            async with harness(store, tmp_path) as h:
                body = {"name": "before"}
                assert (await h.http.post("/v1/users/u1/events", headers=bearer(),
                                          json=body)).status_code == 202
                proxy.cut()
                down = await h.http.post("/v1/users/u1/events", headers=bearer(),
                                         json={"name": "during"})
                assert down.status_code == 503
                assert error_of(down)["code"] == "store_unavailable"
                assert int(down.headers["retry-after"]) > 0
                await tg.start(proxy.serve)  # the store comes back on the same port
                up = await h.http.post("/v1/users/u1/events", headers=bearer(),
                                       json={"name": "after"})
                assert up.status_code == 202
                assert [r.name for r in await h.rows(schema.events)] == ["before", "after"]
        finally:
            await store.close()
            proxy.cut()
