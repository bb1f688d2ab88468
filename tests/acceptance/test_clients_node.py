"""The Node clients of issue #17, installed from npm (tests/clients/package.json), against
one running segflowd on SQLite.

tests/clients/node_clients.mjs drives @segment/analytics-node, @rudderstack/rudder-sdk-node
(its default gzip: gzipped JSON labelled ``application/x-www-form-urlencoded``) and
customerio-node 5 over http (Track API v1 and the v2 batch): an anonymous event, an
identify (linking the anonymous id for the Segment protocol), a track sent twice with one
message id, a page, through each client's batching; the test then reads the store:
attributes, properties, the client's timestamps, one copy of the retried event, the
anonymous event given to the user. Without node or the npm packages the tests skip,
but fail under ``CI=true`` (.ci/run installs both).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from daemon_harness import (
    API_SECRET,
    CLIENTS_DIR,
    RunningDaemon,
    require_npm_clients,
    running_daemon,
    store_rows,
)

from segflowd.schema import anonymous_links, events, users

pytestmark = pytest.mark.slow

SCRIPT = CLIENTS_DIR / "node_clients.mjs"
KEY_NAME = "default"  # daemon_harness's key: Customer.io's site id
RUN_TIMEOUT = 60.0  # seconds for one client's whole script
ORDERED_AT = dt.datetime(2026, 1, 2, 3, 4, 5)  # node_clients.mjs's track timestamp (UTC)
SKEW = dt.timedelta(seconds=60)  # clock-skew correction moves a timestamp by the latency


@pytest.fixture(scope="module")
def node() -> str:
    return require_npm_clients()


@pytest.fixture(scope="module")
def daemon(node: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    folder = tmp_path_factory.mktemp("clients-node")
    with running_daemon(folder / "d", store_url=f"sqlite+aiosqlite:///{folder}/segflow.db"
                        ) as d:
        yield d


def _drive(node: str, d: RunningDaemon, client: str, prefix: str) -> list[str]:
    """Run node_clients.mjs for ``client``; the errors the client reported."""
    done = subprocess.run([node, str(SCRIPT), client, d.base_url, KEY_NAME, API_SECRET, prefix],
                          cwd=CLIENTS_DIR, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    errors: list[str] = json.loads(done.stdout.strip().splitlines()[-1])["errors"]
    return errors


def _events(d: RunningDaemon, where: sa.ColumnElement[bool]) -> list[sa.RowMapping]:
    return store_rows(d.store_url, sa.select(events).where(where).order_by(events.c.id))


def _user(d: RunningDaemon, user_id: str) -> dict[str, Any]:
    r = httpx.get(f"{d.base_url}/v1/users/{user_id}",
                  headers={"Authorization": f"Bearer {API_SECRET}"}, timeout=10)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _order(d: RunningDaemon, uid: str) -> sa.RowMapping:
    """The one stored ``Order Completed`` of ``uid`` (sent twice with one message id)."""
    orders = _events(d, (events.c.user_id == uid) & (events.c.name == "Order Completed"))
    assert len(orders) == 1
    assert {k: orders[0]["attributes"][k] for k in ("total", "items")} == {
        "total": 42.5, "items": ["a", "b"]}
    return orders[0]


@pytest.mark.parametrize("client", ["segment", "rudder"])
def test_segment_protocol_node_client(node: str, daemon: RunningDaemon, client: str) -> None:
    prefix = f"node-{client}"
    uid, anon = f"{prefix}-u1", f"{prefix}-anon-1"
    errors = _drive(node, daemon, client, prefix)
    assert errors == [], "\n".join(errors)
    user = _user(daemon, uid)
    assert (user["email"], user["attributes"]["plan"]) == (f"{prefix}@example.com", "pro")
    assert store_rows(daemon.store_url, sa.select(anonymous_links.c.user_id).where(
        anonymous_links.c.anonymous_id == anon)) == [{"user_id": uid}]
    visited = _events(daemon, events.c.anonymous_id == anon)
    assert [(e["name"], e["user_id"], e["attributes"]["path"]) for e in visited] == [
        ("Visited", uid, "/")]
    assert abs(_order(daemon, uid)["created_at"] - ORDERED_AT) < SKEW
    pages = _events(daemon, (events.c.user_id == uid) & (events.c.name == "$page"))
    assert [(p["attributes"]["name"], p["attributes"]["url"]) for p in pages] == [
        ("Pricing", "/pricing")]


def test_customerio_node_track_v1_and_v2_batch(node: str, daemon: RunningDaemon) -> None:
    prefix = "node-cio"
    uid = f"{prefix}-u1"
    errors = _drive(node, daemon, "customerio", prefix)  # the v2 batch comes last
    user = _user(daemon, uid)
    assert (user["email"], user["attributes"]["plan"]) == (f"{prefix}@example.com", "pro")
    assert store_rows(daemon.store_url, sa.select(users.c.created_at).where(
        users.c.id == uid)) == [{"created_at": dt.datetime(2024, 6, 1, 12)}]
    assert _order(daemon, uid)["created_at"] == ORDERED_AT  # no sentAt: taken as sent
    pages = _events(daemon, (events.c.user_id == uid) & (events.c.name == "$page"))
    assert [p["attributes"]["url"] for p in pages] == ["/pricing"]
    anonymous = _events(daemon, events.c.anonymous_id == f"{prefix}-anon-1")
    assert [(e["name"], e["attributes"]["path"]) for e in anonymous] == [("Visited", "/")]
    assert errors == [], "\n".join(errors)
    batched = _user(daemon, f"{prefix}-u2")  # Track API v2 /api/v2/batch
    assert (batched["email"], batched["attributes"]["plan"]) == (f"{prefix}2@example.com",
                                                                 "team")
    invited = _events(daemon, events.c.user_id == f"{prefix}-u2")
    assert [(e["name"], e["attributes"]["by"]) for e in invited] == [("Invited", uid)]
