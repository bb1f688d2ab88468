"""Every route needs a valid key, except the few that are public by design.

The routes are read from the running daemon's router, so a route added later is checked
too (or must be added to the public list here, on purpose). Public by design: the
health check, the signed tracking and unsubscribe links, and the provider webhooks
(which check their own credentials or signatures). ``/metrics`` is public only while
``[http] metrics_key`` is unset; it is set here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from asgi_daemon import Reply, asgi_call, assert_sane, running
from daemon_harness import API_SECRET

from segflowd import Segflow, schema
from segflowd.daemon import Daemon
from segflowd.delivery.templates import COMPONENTS_DIR

pytestmark = pytest.mark.anyio

METRICS_KEY = "metrics-secret"
OTHER_SECRET = "second-key-secret"
HOOK_USER, HOOK_PASSWORD = "hook", "hook-secret"
# A second key, and a postmark provider table so its webhook checks credentials.
EXTRA = f"""
[[http.keys]]
name = "second"
secret = "{OTHER_SECRET}"

[providers.pm]
plugin = "postmark"
webhook_username = "{HOOK_USER}"
webhook_password = "{HOOK_PASSWORD}"
"""
ENVIRON = {"SEGFLOW_HTTP_METRICS_KEY": METRICS_KEY}
PUBLIC_PREFIXES = ("/healthz", "/t/", "/u/", "/webhooks/")

# One body every write route would accept: each API reads the fields it knows.
BODY = json.dumps({
    "attributes": {"plan": "pro"}, "name": "signed_up", "userId": "sec-user",
    "event": "signed_up", "traits": {"plan": "pro"}, "previousId": "anon-1", "groupId": "g1",
    "batch": [{"type": "track", "userId": "sec-user", "event": "signed_up"},
              {"type": "identify", "userId": "sec-other", "traits": {"plan": "free"}}],
    "anonymous_id": "anon-2", "email": "sec@example.com",
}).encode()
# The native API refuses fields it does not read: its routes get only theirs.
NATIVE_USER = json.dumps({"attributes": {"plan": "pro"}}).encode()
NATIVE_EVENT = json.dumps({"attributes": {"plan": "pro"}, "name": "signed_up"}).encode()
# The send routes (native Bearer auth): a template of the daemon's app, to an address.
SEND = json.dumps({"to": "sec@example.com", "transactional_message_id": "welcome"}).encode()
NATIVE_SEND = json.dumps({"to": "sec@example.com"}).encode()
DEVICE = json.dumps({"device": {"id": "tok-1", "platform": "ios"}}).encode()
# A merge of a user into itself is refused (409): another one, created by the batch.
PUSH = json.dumps({"delivery_id": "999", "event": "opened", "device_id": "tok-1",
                   "timestamp": 1700000000}).encode()
ENTITY = {"type": "person", "action": "event", "identifiers": {"id": "sec-user"},
          "name": "signed_up"}
MERGE = json.dumps({"primary": {"id": "sec-user"}, "secondary": {"id": "sec-other"}}).encode()
NATIVE_PREFIXES = ("/v1/users", "/v1/send/")


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def good(template: str) -> bytes:
    """The valid credentials of the API the route belongs to."""
    if template == "/metrics":
        return f"Bearer {METRICS_KEY}".encode()
    if template.startswith(NATIVE_PREFIXES):
        return f"Bearer {API_SECRET}".encode()
    if template.startswith("/api/"):
        return basic("default", API_SECRET)
    return basic(API_SECRET, "")  # Segment: the secret as user name


# Missing, garbage, wrong, and right-secret-but-wrong-scheme credentials.
BAD: list[bytes | None] = [
    None, b"", b"Bearer", b"Bearer ", b"Bearer wrong-secret", b"Bearer " + API_SECRET.encode()[:-1],
    b"Bearer " + API_SECRET.encode() + b"x", f"Bearer {API_SECRET.upper()}".encode(),
    f"Token {API_SECRET}".encode(), API_SECRET.encode(), b"Basic", b"Basic %%%",
    basic("default", "wrong"), basic("second", API_SECRET), basic("nobody", API_SECRET),
    basic("default", OTHER_SECRET), basic("wrong-secret", ""), basic("", API_SECRET),
    b"\xff\xfe",
]


def wrong_scheme(template: str) -> list[bytes]:
    """The valid secret, presented the way another API (or metrics) would take it."""
    if template == "/metrics":
        return [f"Bearer {API_SECRET}".encode(), basic(METRICS_KEY, "")]
    bare = b"Basic " + base64.b64encode(API_SECRET.encode())  # Segment's, without ":"
    if template.startswith(NATIVE_PREFIXES):
        return [basic(API_SECRET, ""), basic("default", API_SECRET), bare]
    if template.startswith("/api/"):
        return [f"Bearer {API_SECRET}".encode(), basic(API_SECRET, ""), bare]
    return [f"Bearer {API_SECRET}".encode(), basic("default", "")]


def is_public(template: str) -> bool:
    return template.startswith(PUBLIC_PREFIXES)


def is_browser_open(method: str, template: str) -> bool:
    """CORS preflights and analytics.js's own metrics (``/v1/m``): public by design (a
    browser sends no key with them), and they write nothing."""
    return method == "OPTIONS" or template == "/v1/m"


def protected_routes(d: Daemon) -> list[tuple[str, str]]:
    return [(m, t) for m, t in d.router.routes()
            if not is_public(t) and not is_browser_open(m, t)]


@pytest.fixture
async def daemon(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Daemon]:
    app = Segflow(templates=COMPONENTS_DIR)
    app.template("welcome", subject="Welcome", html="layout.html")
    async with running(tmp_path / "d", sqlite_url, app=app, extra=EXTRA,
                       environ=ENVIRON) as d:
        yield d


async def request(d: Daemon, method: str, template: str, auth: bytes | None,
                  body: bytes | None = None) -> Reply:
    if body is None:
        body = {"/v1/users/{id}/events": NATIVE_EVENT, "/v1/users/{id}": NATIVE_USER,
                "/v1/send/email": SEND, "/v1/send/{template}": NATIVE_SEND,
                "/api/v1/customers/{id}/devices": DEVICE,
                "/api/v1/merge_customers": MERGE,
                "/api/v1/push/events": PUSH, "/api/v2/entity": json.dumps(ENTITY).encode(),
                "/api/v2/batch": json.dumps({"batch": [ENTITY]}).encode(),
                "/v1/users/{id}/subscriptions": b'{"all": true}'}.get(template, BODY)
    path = (template.replace("{id}", "sec-user").replace("{token}", "not-a-token")
            .replace("{template}", "welcome"))
    headers = [(b"content-type", b"application/json")]
    if auth is not None:
        headers.append((b"authorization", auth))
    return await asgi_call(d.router, method, path.encode(), headers, body)


async def count(d: Daemon, table: sa.Table) -> int:
    async with d.store.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar())


async def test_the_route_table_has_the_api_routes_and_only_the_known_public_ones(
        daemon: Daemon) -> None:
    routes = daemon.router.routes()
    protected = set(protected_routes(daemon))
    assert {("PUT", "/v1/users/{id}"), ("GET", "/v1/users/{id}"),
            ("DELETE", "/v1/users/{id}"), ("POST", "/v1/users/{id}/events"),
            ("POST", "/v1/batch"), ("POST", "/v1/track"), ("PUT", "/api/v1/customers/{id}"),
            ("POST", "/api/v1/events"), ("GET", "/metrics")} <= protected
    assert sorted((m, t) for m, t in routes if is_public(t)) == [
        ("GET", "/healthz"), ("GET", "/t/c/{token}"), ("GET", "/t/o/{token}"),
        ("GET", "/u/{token}"), ("POST", "/u/{token}"), ("POST", "/webhooks/postmark"),
        ("POST", "/webhooks/ses")]


async def test_every_protected_route_refuses_missing_wrong_and_misplaced_keys(
        daemon: Daemon) -> None:
    protected = protected_routes(daemon)
    for method, template in protected:
        for auth in [*BAD, *wrong_scheme(template)]:
            reply = await request(daemon, method, template, auth)
            assert_sane(reply, (method, template, auth))
            assert reply.status == 401, (method, template, auth, reply.body)
            assert reply.json()["error"]["code"] == "unauthorized"
            assert reply.headers["www-authenticate"]
    # A Segment request may carry its key as "writeKey" in the body instead: a wrong one
    # is refused the same way.
    for method, template in protected:
        if template.startswith("/v1/") and not template.startswith(NATIVE_PREFIXES):
            body = json.dumps({**json.loads(BODY), "writeKey": "wrong-secret"}).encode()
            reply = await request(daemon, method, template, None, body)
            assert reply.status == 401, (template, reply.body)
    for table in (schema.users, schema.events, schema.anonymous_links):
        assert await count(daemon, table) == 0, table.name  # nothing of it was written


async def test_each_protected_route_takes_its_valid_key(daemon: Daemon) -> None:
    """The control for the refusals above: with the right key, the same requests pass."""
    protected = protected_routes(daemon)
    segment_track = await request(daemon, "POST", "/v1/track", None, json.dumps(
        {**json.loads(BODY), "writeKey": OTHER_SECRET}).encode())
    assert segment_track.status == 200  # any configured key is a valid write key
    # create first; forget last (after a forget, writes for the id are refused with 409)
    for method, template in sorted(protected, key=lambda r: (r[0] != "PUT", r[0] == "DELETE")):
        reply = await request(daemon, method, template, good(template))
        assert_sane(reply, (method, template))
        assert 200 <= reply.status < 300 or (method, reply.status) == ("GET", 404), \
            (method, template, reply.status, reply.body)


async def test_public_routes_give_nothing_away_without_credentials(daemon: Daemon) -> None:
    for method, template in daemon.router.routes():
        if not is_public(template) or template == "/healthz":
            continue
        for auth in (None, b"Bearer wrong", basic(HOOK_USER, "wrong")):
            reply = await request(daemon, method, template, auth)
            assert_sane(reply, (method, template))
            # Links with no valid token are "not found"; webhooks want their own proof.
            assert reply.status in (401, 403, 404), (method, template, reply.status)
    for method, template in daemon.router.routes():
        if is_browser_open(method, template):
            reply = await request(daemon, method, template, None)
            assert_sane(reply, (method, template))
            assert reply.status in (200, 204), (method, template, reply.status)
    for table in (schema.users, schema.events):
        assert await count(daemon, table) == 0, table.name
    health = await request(daemon, "GET", "/healthz", None)
    assert health.status == 200
    assert set(health.json()) == {"status", "store", "version", "uptime_s", "stopping"}
    for table in (schema.suppressions, schema.subscriptions, schema.engagement):
        assert await count(daemon, table) == 0, table.name
