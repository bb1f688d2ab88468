"""The Customer.io Track API beyond identify and events, on SQLite and MariaDB: devices,
suppress/unsuppress, merge_customers, push metrics and the v2 entity/batch routes."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_ingest import NOW, SECRET, Harness, basic, error_of, harness
from test_segment_engine import kernel_for

from segflowd import schema
from segflowd.app import Segflow
from segflowd.segments.engine import SegmentService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

CIO = basic("site-a", SECRET)


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(store, tmp_path) as running:
        yield running


@pytest.fixture
async def lite(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """On SQLite only: for refusals, which are decided before the store is asked."""
    store = Store.open(sqlite_url)
    await store.migrate()
    try:
        async with harness(store, tmp_path) as running:
            yield running
    finally:
        await store.close()


async def _user(h: Harness, uid: str, **attributes: object) -> None:
    r = await h.http.put(f"/api/v1/customers/{uid}", headers=CIO, json=attributes)
    assert r.status_code == 200


async def _shown(h: Harness, uid: str) -> dict[str, object]:
    r = await h.http.get(f"/v1/users/{uid}", headers={"Authorization": f"Bearer {SECRET}"})
    assert r.status_code == 200
    body: dict[str, object] = r.json()
    return body


# -- devices -----------------------------------------------------------------------------

async def test_devices_are_added_shown_moved_and_deleted(h: Harness) -> None:
    r = await h.http.put("/api/v1/customers/u1/devices", headers=CIO, json={"device": {
        "id": "tok-1", "platform": "ios", "last_used": 1767225600, "app_version": "2.1"}})
    assert r.status_code == 200
    assert r.json() == {}
    (device,) = (await _shown(h, "u1"))["devices"]  # type: ignore[misc]
    assert device["id"] == "tok-1"
    assert device["platform"] == "ios"
    assert device["last_used"] == "2026-01-01T00:00:00Z"
    assert device["attributes"] == {"app_version": "2.1"}
    # The token goes with whoever registers it last.
    r = await h.http.put("/api/v1/customers/u2/devices", headers=CIO,
                         json={"device": {"id": "tok-1", "platform": "IOS"}})
    assert r.status_code == 200
    assert (await _shown(h, "u1"))["devices"] == []
    assert [d["id"] for d in (await _shown(h, "u2"))["devices"]] == ["tok-1"]  # type: ignore[attr-defined]
    # Deleting it from the wrong user changes nothing; from its user, deletes it.
    r = await h.http.delete("/api/v1/customers/u1/devices/tok-1", headers=CIO)
    assert r.status_code == 200
    assert len(await h.rows(schema.devices)) == 1
    r = await h.http.delete("/api/v1/customers/u2/devices/tok-1", headers=CIO)
    assert r.status_code == 200
    assert await h.rows(schema.devices) == []


@pytest.mark.parametrize(("body", "field"), [
    ({}, "device"),
    ({"device": {"platform": "ios"}}, "device.id"),
    ({"device": {"id": "t", "platform": "windows"}}, "device.platform"),
    ({"device": {"id": "t", "platform": "ios", "last_used": "soon"}}, "device.last_used"),
    ({"device": {"id": "t", "platform": "ios", "attributes": [1]}}, "device.attributes"),
])
async def test_a_bad_device_is_a_400_naming_the_field_and_writes_nothing(
        lite: Harness, body: dict[str, object], field: str) -> None:
    r = await lite.http.put("/api/v1/customers/u1/devices", headers=CIO, json=body)
    assert r.status_code == 400
    assert error_of(r)["message"].startswith(f"{field}:")
    assert await lite.rows(schema.users) == []
    assert await lite.rows(schema.devices) == []


async def test_device_routes_need_customerio_auth(lite: Harness) -> None:
    r = await lite.http.put("/api/v1/customers/u1/devices", headers=basic("site-a", "wrong"),
                         json={"device": {"id": "t", "platform": "ios"}})
    assert r.status_code == 401
    assert await lite.rows(schema.devices) == []


async def test_forgetting_a_user_deletes_their_devices(h: Harness) -> None:
    await h.http.put("/api/v1/customers/u1/devices", headers=CIO,
                     json={"device": {"id": "tok-9", "platform": "android"}})
    assert len(await h.rows(schema.devices)) == 1
    assert (await h.http.delete("/api/v1/customers/u1", headers=CIO)).status_code == 200
    assert await h.rows(schema.devices) == []


# -- suppression -------------------------------------------------------------------------

async def test_suppress_and_unsuppress_the_users_address(h: Harness) -> None:
    await _user(h, "u1", email="Ann <ANN@Example.com>")
    r = await h.http.post("/api/v1/customers/u1/suppress", headers=CIO, json={})
    assert r.status_code == 200
    (row,) = await h.rows(schema.suppressions)
    assert (row.address, row.reason, row.source) == ("ann@example.com", "manual", "customerio")
    assert len(await h.rows(schema.users)) == 1  # kept, unlike Customer.io
    r = await h.http.post("/api/v1/customers/u1/unsuppress", headers=CIO, json={})
    assert r.status_code == 200
    assert await h.rows(schema.suppressions) == []


async def test_unsuppress_leaves_a_bounce_on_the_list(h: Harness) -> None:
    await _user(h, "u1", email="bob@example.com")
    async with h.store.begin() as conn:
        await conn.execute(sa.insert(schema.suppressions).values(
            address="bob@example.com", reason="bounce:550", source="smtp", created_at=NOW))
    r = await h.http.post("/api/v1/customers/u1/unsuppress", headers=CIO, json={})
    assert r.status_code == 409
    assert "bounce:550" in error_of(r)["message"]
    assert len(await h.rows(schema.suppressions)) == 1


async def test_suppress_without_an_address_or_user_says_why(lite: Harness) -> None:
    await _user(lite, "u1", plan="pro")
    r = await lite.http.post("/api/v1/customers/u1/suppress", headers=CIO, json={})
    assert r.status_code == 422
    assert "no email address" in error_of(r)["message"]
    r = await lite.http.post("/api/v1/customers/nobody/suppress", headers=CIO, json={})
    assert r.status_code == 404
    assert await lite.rows(schema.suppressions) == []


# -- merge -------------------------------------------------------------------------------

async def _merge_fixture(h: Harness) -> None:
    await _user(h, "p", email="p@example.com", plan="pro")
    await _user(h, "s", email="s@example.com", plan="free", city="Oslo")
    for uid, name in (("p", "paid"), ("s", "visited"), ("s", "clicked")):
        r = await h.http.post(f"/api/v1/customers/{uid}/events", headers=CIO,
                              json={"name": name, "id": f"{uid}-{name}"})
        assert r.status_code == 200
    r = await h.http.post("/v1/identify", headers=basic(SECRET),
                          json={"userId": "s", "anonymousId": "anon-s"})
    assert r.status_code == 200
    await h.http.put("/api/v1/customers/s/devices", headers=CIO,
                     json={"device": {"id": "tok-s", "platform": "ios"}})
    earlier = NOW - dt.timedelta(days=30)
    async with h.store.begin() as conn:
        await conn.execute(sa.update(schema.users).where(schema.users.c.id == "s")
                           .values(created_at=earlier))
        await conn.execute(sa.insert(schema.segment_members).values(
            segment="visitors", user_id="s", entered_at=NOW, evaluated_at=NOW))
        await conn.execute(sa.insert(schema.flow_instances).values(
            campaign="onboarding", user_id="s", version="v1", status="waiting", live=1,
            wake_at=NOW + dt.timedelta(days=1), created_at=NOW, updated_at=NOW))
        await conn.execute(sa.insert(schema.subscriptions).values(
            user_id="s", topic="marketing", unsubscribed_at=NOW, updated_at=NOW))


async def test_merge_folds_the_secondary_into_the_primary(h: Harness) -> None:
    await _merge_fixture(h)
    r = await h.http.post("/api/v1/merge_customers", headers=CIO,
                          json={"primary": {"id": "p"}, "secondary": {"email": "s@example.com"}})
    assert r.status_code == 200, r.text
    users = {u.id: u for u in await h.rows(schema.users)}
    assert set(users) == {"p"}
    p = users["p"]
    assert p.attributes == {"email": "p@example.com", "plan": "pro", "city": "Oslo"}
    assert p.email == "p@example.com"
    assert p.created_at == NOW - dt.timedelta(days=30)
    events = await h.rows(schema.events)
    assert sorted((e.user_id, e.name) for e in events) == [
        ("p", "clicked"), ("p", "paid"), ("p", "visited")]
    (link,) = await h.rows(schema.anonymous_links)
    assert link.user_id == "p"
    (device,) = await h.rows(schema.devices)
    assert device.user_id == "p"
    assert await h.rows(schema.segment_members) == []
    (instance,) = await h.rows(schema.flow_instances)
    assert (instance.user_id, instance.status, instance.live, instance.wake_at) == (
        "p", "exited", None, None)
    (sub,) = await h.rows(schema.subscriptions)
    assert (sub.user_id, sub.unsubscribed_at) == ("p", NOW)
    (told,) = [b for b in h.sink.batches if b.deleted]
    assert told.users == frozenset({"p"})
    assert h.sink.batches[-1].users == frozenset({"p"})  # the gained attributes, again
    assert told.deleted == frozenset({"s"})
    assert dict(told.left) == {"s": ("visitors",)}
    # The secondary's id is free again: a later event makes a new user of it.
    r = await h.http.post("/api/v1/customers/s/events", headers=CIO, json={"name": "back"})
    assert r.status_code == 200
    assert {u.id for u in await h.rows(schema.users)} == {"p", "s"}


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"primary": {"id": "p"}}, 400, "secondary"),
    ({"primary": {"id": "p"}, "secondary": {"id": "p"}}, 400, "secondary"),
    ({"primary": {"cio_id": "x"}, "secondary": {"id": "s"}}, 400, "primary.cio_id"),
    ({"primary": {"id": "p"}, "secondary": {"email": "bad"}}, 400, "secondary.email"),
    ({"primary": {"id": "p"}, "secondary": {"id": "ghost"}}, 404, "secondary"),
    ({"primary": {"email": "x@example.com"}, "secondary": {"id": "s"}}, 404, "primary.email"),
])
async def test_a_merge_that_cannot_be_done_changes_nothing(
        lite: Harness, body: dict[str, object], status: int, field: str) -> None:
    await _user(lite, "p", plan="pro")
    await _user(lite, "s", plan="free")
    r = await lite.http.post("/api/v1/merge_customers", headers=CIO, json=body)
    assert r.status_code == status
    assert error_of(r)["message"].startswith(f"{field}")
    assert {u.id: u.attributes for u in await lite.rows(schema.users)} == {
        "p": {"plan": "pro"}, "s": {"plan": "free"}}


# -- push metrics ------------------------------------------------------------------------

async def test_push_events_count_on_the_message_and_unknown_ids_are_only_counted(
        h: Harness) -> None:
    await _user(h, "u1")
    async with h.store.begin() as conn:
        mid = (await conn.execute(sa.insert(schema.messages).values(
            user_id="u1", kind="campaign", template="welcome", status="sent",
            created_at=NOW, updated_at=NOW))).inserted_primary_key[0]
    for event in ("opened", "opened", "converted"):
        r = await h.http.post("/api/v1/push/events", headers=CIO, json={
            "delivery_id": str(mid), "event": event, "device_id": "tok", "timestamp": 1767225600})
        assert r.status_code == 200
    rows = sorted((e.kind, e.hits, e.user_id) for e in await h.rows(schema.engagement))
    assert rows == [("converted", 1, "u1"), ("open", 2, "u1")]
    r = await h.http.post("/api/v1/push/events", headers=CIO,
                          json={"delivery_id": "not-ours", "event": "delivered"})
    assert r.status_code == 200
    assert h.kernel.metrics.value("segflow_ingest_push_unknown_total") == 1
    r = await h.http.post("/api/v1/push/events", headers=CIO,
                          json={"delivery_id": str(mid), "event": "bounced"})
    assert r.status_code == 400
    assert error_of(r)["message"].startswith("event:")


# -- Track API v2 ------------------------------------------------------------------------

async def test_v2_entity_identifies_and_tracks(h: Harness) -> None:
    r = await h.http.post("/api/v2/entity", headers=CIO, json={
        "type": "person", "action": "identify", "identifiers": {"id": "u1"},
        "attributes": {"email": "u1@example.com", "plan": "pro"}})
    assert r.status_code == 200
    r = await h.http.post("/api/v2/entity", headers=CIO, json={
        "type": "person", "action": "event", "identifiers": {"email": "u1@example.com"},
        "name": "paid", "attributes": {"total": 5}, "timestamp": 1767225600, "id": "e1"})
    assert r.status_code == 200
    (event,) = await h.rows(schema.events)
    assert (event.user_id, event.name, event.attributes) == ("u1", "paid", {"total": 5})
    assert event.created_at == dt.datetime(2026, 1, 1)


async def test_v2_batch_applies_every_action(h: Harness) -> None:
    batch = [
        {"type": "person", "action": "identify", "identifiers": {"email": "New@Example.com"},
         "attributes": {"plan": "free"}},
        {"type": "person", "action": "page", "identifiers": {"email": "New@example.com"},
         "name": "/pricing"},
        {"type": "person", "action": "screen", "identifiers": {"id": "u2"}, "name": "Home"},
        {"type": "person", "action": "add_device", "identifiers": {"id": "u2"},
         "device": {"token": "tok-2", "platform": "android"}},
        {"type": "person", "action": "add_device", "identifiers": {"id": "u2"},
         "device": {"token": "tok-3", "platform": "ios"}},
        {"type": "person", "action": "delete_device", "identifiers": {"id": "u2"},
         "device": {"token": "tok-3"}},
        {"type": "person", "action": "identify", "identifiers": {"id": "gone"}},
    ]
    r = await h.http.post("/api/v2/batch", headers=CIO, json={"batch": batch})
    assert r.status_code == 200, r.text
    users = {u.id: u for u in await h.rows(schema.users)}
    assert users["New@example.com"].attributes == {"plan": "free", "email": "New@example.com"}
    events = sorted((e.user_id, e.name, json.dumps(e.attributes))
                    for e in await h.rows(schema.events))
    assert events == [("New@example.com", "$page", '{"url": "/pricing"}'),
                      ("u2", "$screen", '{"name": "Home"}')]
    assert [(d.token, d.user_id) for d in await h.rows(schema.devices)] == [("tok-2", "u2")]
    r = await h.http.post("/api/v2/batch", headers=CIO, json={"batch": [
        {"type": "person", "action": "delete", "identifiers": {"id": "gone"}}]})
    assert r.status_code == 200
    assert "gone" not in {u.id for u in await h.rows(schema.users)}


@pytest.mark.parametrize(("item", "field"), [
    ({"type": "object", "action": "identify", "identifiers": {"id": "x"}}, "batch[1].type"),
    ({"type": "person", "action": "merge", "identifiers": {"id": "x"}}, "batch[1].action"),
    ({"type": "person", "action": "identify", "identifiers": {}}, "batch[1].identifiers"),
    ({"type": "person", "action": "identify", "identifiers": {"cio_id": "1"}},
     "batch[1].identifiers.cio_id"),
    ({"type": "person", "action": "event", "identifiers": {"id": "x"}}, "batch[1].name"),
    ({"type": "person", "action": "add_device", "identifiers": {"id": "x"},
      "device": {"token": "t", "platform": "web"}}, "batch[1].device.platform"),
])
async def test_a_bad_batch_item_refuses_the_whole_batch(
        lite: Harness, item: dict[str, object], field: str) -> None:
    ok = {"type": "person", "action": "identify", "identifiers": {"id": "u1"},
          "attributes": {"plan": "pro"}}
    r = await lite.http.post("/api/v2/batch", headers=CIO, json={"batch": [ok, item]})
    assert r.status_code == 400
    assert error_of(r)["message"].startswith(f"{field}:")
    assert await lite.rows(schema.users) == []


async def test_v2_batch_over_the_request_limit_is_a_413(lite: Harness) -> None:
    big = [{"type": "person", "action": "identify", "identifiers": {"id": f"u{i}"},
            "attributes": {"bio": "x" * 500}} for i in range(40)]  # over max_request_bytes
    r = await lite.http.post("/api/v2/batch", headers=CIO, json={"batch": big})
    assert r.status_code == 413
    assert await lite.rows(schema.users) == []


async def test_v2_event_by_unknown_email_is_a_404(lite: Harness) -> None:
    r = await lite.http.post("/api/v2/entity", headers=CIO, json={
        "type": "person", "action": "event", "identifiers": {"email": "who@example.com"},
        "name": "x"})
    assert r.status_code == 404
    assert "identifiers.email" in error_of(r)["message"]


# -- migration ---------------------------------------------------------------------------

async def test_a_version_7_store_gains_the_devices_table(store: Store) -> None:
    async with store.begin() as conn:
        await conn.execute(sa.text("DROP TABLE devices"))
        await conn.execute(sa.update(schema.schema_version).values(version=7))
    assert await store.migrate() == 7
    assert await store.read_schema_version() == schema.SCHEMA_VERSION
    async with store.begin() as conn:
        await conn.execute(sa.insert(schema.devices).values(
            token="t", user_id="u", platform="ios", attributes={}, created_at=NOW,
            updated_at=NOW))
        assert (await conn.execute(sa.select(sa.func.count()).select_from(schema.devices))
                ).scalar_one() == 1


async def test_a_merge_moves_segment_membership_to_the_primary(
        h: Harness, tmp_path: Path) -> None:
    """The real segment engine, told by the merge: the secondary leaves, the primary (who
    gained the secondary's plan) enters."""
    app = Segflow()

    @app.segment("pro")
    def pro():  # type: ignore[no-untyped-def]
        return sa.select(schema.users.c.id).where(
            schema.users.c.attributes["plan"].as_string() == "pro")

    (tmp_path / "seg").mkdir()
    engine = SegmentService(kernel_for(h.store, app, FakeClock(NOW), tmp_path / "seg"),
                            membership_sinks=[])
    await engine.start()
    h.service.committer.sinks.append(engine)  # type: ignore[attr-defined]
    await _user(h, "p", email="p@example.com")
    await _user(h, "s", plan="pro")
    await engine.drain_once()
    members = sa.select(schema.segment_members.c.user_id)
    assert [r.user_id for r in await h.rows(schema.segment_members)] == ["s"]
    r = await h.http.post("/api/v1/merge_customers", headers=CIO,
                          json={"primary": {"id": "p"}, "secondary": {"id": "s"}})
    assert r.status_code == 200
    changes = await engine.drain_once()
    assert sorted((c.user_id, c.entered) for c in changes) == [("p", True), ("s", False)]
    async with h.store.connect() as conn:
        assert [str(u) for u in (await conn.execute(members)).scalars()] == ["p"]
