"""Tracking from browsers and every Segment client: analytics.js's short routes, CORS,
bodies whatever their labels, context.traits, clock skew, signup time, error bodies
with top-level code/message, and unrouted requests in /metrics (issue #17)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_ingest import NOW, SECRET, Harness, basic, bearer, error_of, harness

from segflowd import schema
from segflowd.ingest import unrouted
from segflowd.store import Store

pytestmark = pytest.mark.anyio

SITE = "https://shop.example"
TEXT = {"Content-Type": "text/plain", "Origin": SITE}  # what analytics.js sends


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(store, tmp_path) as running:
        yield running


def text_body(body: object) -> bytes:
    return json.dumps(body).encode()


async def test_short_routes_store_what_the_long_routes_do(h: Harness) -> None:
    calls = [
        ("i", {"userId": "u1", "traits": {"email": "ann@example.com"}}),
        ("t", {"userId": "u1", "event": "signup", "properties": {"via": "ad"}}),
        ("p", {"userId": "u1", "name": "Home"}),
        ("s", {"userId": "u1", "name": "Settings"}),
        ("g", {"userId": "u1", "groupId": "g1"}),
        ("a", {"previousId": "anon-9", "userId": "u1"}),
    ]
    for route, body in calls:
        r = await h.http.post(f"/v1/{route}", headers=basic(SECRET), json=body)
        assert r.status_code == 200, (route, r.text)
        assert r.json() == {"success": True}
    (user,) = await h.rows(schema.users)
    assert user.email == "ann@example.com"
    events = {e.name: e.attributes for e in await h.rows(schema.events)}
    assert events == {"signup": {"via": "ad"}, "$page": {"name": "Home"},
                      "$screen": {"name": "Settings"},
                      "$group": {"groupId": "g1", "traits": {}}}
    (link,) = await h.rows(schema.anonymous_links)
    assert (link.anonymous_id, link.user_id) == ("anon-9", "u1")


@pytest.mark.parametrize("route", ["b", "import"])
async def test_b_and_import_take_a_batch(h: Harness, route: str) -> None:
    body = {"batch": [{"type": "track", "userId": "u1", "event": "one"},
                      {"type": "identify", "userId": "u1", "traits": {"plan": "pro"}}]}
    r = await h.http.post(f"/v1/{route}", headers=basic(SECRET), json=body)
    assert r.status_code == 200
    assert [e.name for e in await h.rows(schema.events)] == ["one"]
    assert (await h.rows(schema.users))[0].attributes == {"plan": "pro"}


async def test_v1_m_is_200_and_dropped_but_still_size_capped(h: Harness) -> None:
    r = await h.http.post("/v1/m", headers=TEXT, content=b'{"series":[{"type":"Counter"}]}')
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == SITE
    big = await h.http.post("/v1/m", headers=TEXT, content=b"x" * 9000)
    assert big.status_code == 413
    assert await h.rows(schema.events) == []


async def test_browser_preflight_then_text_plain_post_with_write_key_in_body(h: Harness) -> None:
    pre = await h.http.options("/v1/t", headers={
        "Origin": SITE, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == SITE
    assert "x-retry-count" in pre.headers["access-control-allow-headers"]
    r = await h.http.post("/v1/t", headers=TEXT, content=text_body(
        {"writeKey": SECRET, "anonymousId": "a1", "event": "viewed"}))
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == SITE
    assert r.headers["vary"] == "Origin"
    (event,) = await h.rows(schema.events)
    assert (event.anonymous_id, event.name) == ("a1", "viewed")


async def test_errors_on_tracking_routes_carry_cors_and_top_level_code(h: Harness) -> None:
    r = await h.http.post("/v1/t", headers=TEXT, content=text_body(
        {"writeKey": "wrong", "userId": "u1", "event": "x"}))
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == SITE
    body = r.json()
    assert (body["code"], body["message"]) == ("unauthorized", "the write key is not valid")
    bad = await h.http.post("/api/v1/customers/u1", headers={**basic("site-a", SECRET),
                                                             "Origin": SITE}, content=b"[")
    assert bad.status_code == 405  # PUT is the route's method: POST is unrouted
    put = await h.http.put("/api/v1/customers/u1", headers={**basic("site-a", SECRET),
                                                            "Origin": SITE}, content=b"[")
    assert put.status_code == 400
    assert put.headers["access-control-allow-origin"] == SITE
    assert error_of(put)["code"] == "invalid_json"


async def test_routes_that_read_or_delete_data_have_no_cors(h: Harness) -> None:
    await h.http.post("/v1/track", headers=basic(SECRET), json={"userId": "u1", "event": "e"})
    origin = {"Origin": SITE}
    got = await h.http.get("/v1/users/u1", headers={**bearer(), **origin})
    assert got.status_code == 200
    for r in (got,
              await h.http.options("/v1/users/u1", headers=origin),
              await h.http.delete("/api/v1/customers/u1",
                                  headers={**basic("site-a", SECRET), **origin}),
              await h.http.delete("/v1/users/u1", headers={**bearer(), **origin})):
        assert "access-control-allow-origin" not in r.headers, r.request.method
    pre = await h.http.options("/api/v1/customers/u1", headers={
        **origin, "Access-Control-Request-Method": "DELETE"})
    assert pre.status_code == 403


async def test_gzip_found_by_magic_bytes_whatever_the_labels(h: Harness) -> None:
    """RudderStack Node: gzipped JSON labelled application/x-www-form-urlencoded."""
    raw = gzip.compress(text_body({"batch": [{"type": "track", "userId": "u1",
                                              "event": "zipped"}]}))
    r = await h.http.post("/v1/batch", content=raw, headers={
        **basic(SECRET), "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    single = await h.http.post("/v1/t", headers=TEXT, content=gzip.compress(text_body(
        {"writeKey": SECRET, "userId": "u1", "event": "plain"})))
    assert single.status_code == 200, single.text
    assert sorted(e.name for e in await h.rows(schema.events)) == ["plain", "zipped"]
    bomb = gzip.compress(text_body({"userId": "u1", "event": "x" * 100_000}))
    r = await h.http.post("/v1/t", headers={**basic(SECRET), "Content-Type": "text/plain"},
                          content=bomb)
    assert r.status_code == 413
    assert "decompressed" in error_of(r)["message"]


async def test_write_key_in_the_body_of_a_batch(h: Harness) -> None:
    body = {"writeKey": SECRET, "batch": [{"type": "page", "anonymousId": "a1", "name": "p"}]}
    assert (await h.http.post("/v1/b", headers=TEXT, content=text_body(body))).status_code == 200
    no_key = await h.http.post("/v1/b", headers=TEXT, content=text_body({"batch": []}))
    assert no_key.status_code == 401
    assert [e.name for e in await h.rows(schema.events)] == ["$page"]


async def test_identify_reads_context_traits_and_top_level_wins(h: Harness) -> None:
    only_context = {"userId": "u1", "context": {"traits": {"email": "ann@example.com"}}}
    both = {"userId": "u2", "traits": {"plan": "pro", "email": "top@example.com"},
            "context": {"traits": {"email": "ctx@example.com", "name": "Bo"}}}
    for body in (only_context, both):
        assert (await h.http.post("/v1/identify", headers=basic(SECRET),
                                  json=body)).status_code == 200
    users = {u.id: u for u in await h.rows(schema.users)}
    assert users["u1"].email == "ann@example.com"
    assert users["u2"].attributes == {"plan": "pro", "email": "top@example.com", "name": "Bo"}
    bad = await h.http.post("/v1/identify", headers=basic(SECRET),
                            json={"userId": "u3", "context": {"traits": [1]}})
    assert bad.status_code == 400
    assert error_of(bad)["message"].startswith("body.context.traits: must be a JSON object")


async def test_sent_at_corrects_the_clients_clock_skew_and_keeps_its_timestamp(
        h: Harness) -> None:
    # The client's clock is 1 hour ahead: it says it sent at 05:04:05 what happened 10 s
    # before; the daemon received it at NOW (03:04:05).
    r = await h.http.post("/v1/track", headers=basic(SECRET), json={
        "userId": "u1", "event": "skewed", "timestamp": "2026-01-02T04:03:55Z",
        "sentAt": "2026-01-02T04:04:05Z"})
    assert r.status_code == 200
    batch = {"sentAt": "2026-01-02T04:04:05Z", "batch": [
        {"type": "track", "userId": "u1", "event": "in_batch",
         "timestamp": "2026-01-02T04:04:00Z"},
        {"type": "track", "userId": "u1", "event": "unsent", "timestamp": "2026-01-01T00:00:00Z",
         "sentAt": "2026-01-01T00:00:00Z"}]}
    assert (await h.http.post("/v1/batch", headers=basic(SECRET), json=batch)).status_code == 200
    plain = {"userId": "u1", "event": "no_sent_at", "timestamp": "2025-12-31T00:00:00Z"}
    assert (await h.http.post("/v1/track", headers=basic(SECRET), json=plain)).status_code == 200
    events = {e.name: e for e in await h.rows(schema.events)}
    assert events["skewed"].created_at == NOW - dt.timedelta(seconds=10)
    assert events["skewed"].attributes == {"$timestamp": "2026-01-02T04:03:55Z"}
    assert events["in_batch"].created_at == NOW - dt.timedelta(seconds=5)
    assert events["unsent"].created_at == NOW  # its own sentAt wins over the batch's
    assert events["no_sent_at"].created_at == dt.datetime(2025, 12, 31)
    assert events["no_sent_at"].attributes == {}
    bad = await h.http.post("/v1/track", headers=basic(SECRET), json={
        "userId": "u1", "event": "x", "timestamp": "2026-01-01T00:00:00Z", "sentAt": "later"})
    assert bad.status_code == 400
    assert error_of(bad)["message"].startswith("body.sentAt: is not an ISO 8601 time")
    far = await h.http.post("/v1/track", headers=basic(SECRET), json={
        "userId": "u1", "event": "x", "timestamp": "1970-01-01T00:00:00Z",
        "sentAt": "9999-01-01T00:00:00Z"})
    assert far.status_code == 400
    assert error_of(far)["message"].startswith("body.sentAt: is too far from timestamp")


async def signup_of(h: Harness, uid: str) -> dt.datetime:
    (user,) = await h.rows(schema.users, schema.users.c.id == uid)
    return user.created_at  # type: ignore[no-any-return]


async def test_created_at_traits_set_the_signup_time(h: Harness) -> None:
    iso = {"userId": "u1", "traits": {"createdAt": "2025-12-01T10:00:00+01:00"}}
    epoch = {"userId": "u2", "context": {"traits": {"created_at": 1764547200}}}
    for body in (iso, epoch):
        assert (await h.http.post("/v1/identify", headers=basic(SECRET),
                                  json=body)).status_code == 200
    assert await signup_of(h, "u1") == dt.datetime(2025, 12, 1, 9, 0)
    assert await signup_of(h, "u2") == dt.datetime(2025, 12, 1)
    assert (await h.rows(schema.users, schema.users.c.id == "u1"))[0].attributes == {
        "createdAt": "2025-12-01T10:00:00+01:00"}
    # A known user (created at NOW by an event) gets the signup time given later.
    await h.http.post("/v1/track", headers=basic(SECRET), json={"userId": "u3", "event": "e"})
    assert await signup_of(h, "u3") == NOW
    batch = {"batch": [{"type": "identify", "userId": "u3",
                        "traits": {"createdAt": "2024-05-06T07:08:09Z"}}]}
    assert (await h.http.post("/v1/batch", headers=basic(SECRET), json=batch)).status_code == 200
    assert await signup_of(h, "u3") == dt.datetime(2024, 5, 6, 7, 8, 9)
    # Without one, a known user's signup time stays.
    await h.http.post("/v1/identify", headers=basic(SECRET),
                      json={"userId": "u3", "traits": {"plan": "pro"}})
    assert await signup_of(h, "u3") == dt.datetime(2024, 5, 6, 7, 8, 9)


async def test_customerio_created_at_attribute_sets_the_signup_time(h: Harness) -> None:
    auth = basic("site-a", SECRET)
    r = await h.http.put("/api/v1/customers/c1", headers=auth,
                         json={"email": "c@example.com", "created_at": 1700000000})
    assert r.status_code == 200
    assert await signup_of(h, "c1") == dt.datetime(2023, 11, 14, 22, 13, 20)
    bad = await h.http.put("/api/v1/customers/c2", headers=auth, json={"created_at": "soon"})
    assert bad.status_code == 400
    assert error_of(bad)["message"].startswith("body.created_at: is not an ISO 8601 time")


@pytest.mark.parametrize(("traits", "field"), [
    ({"createdAt": "last month"}, "body.traits.createdAt: is not an ISO 8601 time"),
    ({"createdAt": True}, "body.traits.createdAt: must be an ISO 8601 string"),
    ({"created_at": 1e300}, "body.traits.created_at: is out of range"),
])
async def test_bad_signup_time_is_400_naming_the_field(h: Harness, traits: dict[str, object],
                                                       field: str) -> None:
    r = await h.http.post("/v1/i", headers=basic(SECRET), json={"userId": "u1",
                                                                 "traits": traits})
    assert r.status_code == 400
    assert error_of(r)["message"].startswith(field)
    assert await h.rows(schema.users) == []


async def test_unrouted_requests_are_counted_by_the_api_aimed_at(h: Harness) -> None:
    assert (await h.http.post("/v1/x", headers=basic(SECRET))).status_code == 404
    assert (await h.http.get("/v1/t")).status_code == 405
    assert (await h.http.post("/api/v2/nothing")).status_code == 404
    metrics = h.kernel.metrics
    assert metrics.value(unrouted.METRIC, api="segment", status="404") == 1
    assert metrics.value(unrouted.METRIC, api="segment", status="405") == 1
    assert metrics.value(unrouted.METRIC, api="customerio", status="404") == 1
    assert await h.rows(schema.events, sa.true()) == []
