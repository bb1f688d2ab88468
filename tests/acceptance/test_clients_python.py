"""The Python clients of issue #17, unchanged but for host and key, against one running
segflowd (SQLite; test_ingest_clients runs the Segment and Customer.io basics on MariaDB).

segment-analytics-python, rudder-sdk-python and customerio-cdp-analytics speak the
Segment protocol: an anonymous track, an identify linking that anonymous id, a track sent
twice with one messageId, a page, all through their batching uploader; the store must
hold the attributes (RudderStack's only in ``context.traits``), the properties, the
client's timestamps, one copy of the retried event and the anonymous event given to the
user. A wrong key must give them an error reply they can read (top-level ``code`` and
``message``). customerio speaks the Track API v1 (identify, track, pageview, devices,
suppress, merge_customers) and the App API (``APIClient.send_email``).

The Customer.io names are imported from their modules (``customerio.track``,
``customerio.api``): customerio-cdp-analytics installs an empty ``customerio/__init__.py``
over customerio's own when pip happens to install it second.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from customerio.analytics.client import Client as CdpClient
from customerio.analytics.request import APIError as CdpAPIError
from customerio.api import APIClient, SendEmailRequest
from customerio.track import CustomerIO
from daemon_harness import API_SECRET, RunningDaemon, running_daemon, store_rows
from rudderstack.analytics.client import Client as RudderClient
from rudderstack.analytics.request import APIError as RudderAPIError
from segment.analytics.client import Client as SegmentClient
from segment.analytics.request import APIError as SegmentAPIError

from segflowd.schema import anonymous_links, events, suppressions, users

pytestmark = [
    pytest.mark.slow,
    # customerio-cdp-analytics calls datetime.utcnow(), deprecated since Python 3.12.
    pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning"),
]

BEARER = {"Authorization": f"Bearer {API_SECRET}"}  # the native API's auth
KEY_NAME = "default"  # daemon_harness's key: Customer.io's site id
SEND_TIMEOUT = 30.0  # seconds for a sent email to appear in the outbox folder
ORDERED_AT = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)  # a track's client timestamp
SIGNED_UP = "2025-06-01T12:00:00Z"  # an identify's createdAt trait
SKEW = dt.timedelta(seconds=60)  # clock-skew correction moves a timestamp by the latency

APP = """from segflowd import Segflow

app = Segflow(templates="templates")
app.template("welcome", subject="Welcome {{ user.name }}", html="welcome.html")
"""
FILES = {"templates/welcome.html": '{% extends "segflow/layout.html" %}'
                                   "{% block content %}Your code is {{ code }}{% endblock %}"}

# The three forks of analytics-python: the same constructor and calls, their own APIError.
SEGMENT_CLIENTS: dict[str, tuple[Callable[..., Any], type[Exception]]] = {
    "segment": (SegmentClient, SegmentAPIError),
    "rudder": (RudderClient, RudderAPIError),
    "cdp": (CdpClient, CdpAPIError),
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    folder = tmp_path_factory.mktemp("clients-python")
    with running_daemon(folder / "d", store_url=f"sqlite+aiosqlite:///{folder}/segflow.db",
                        app=APP, files=FILES) as d:
        yield d


def _events(d: RunningDaemon, where: sa.ColumnElement[bool]) -> list[sa.RowMapping]:
    return store_rows(d.store_url, sa.select(events).where(where).order_by(events.c.id))


def _user(d: RunningDaemon, user_id: str) -> dict[str, Any]:
    r = httpx.get(f"{d.base_url}/v1/users/{user_id}", headers=BEARER, timeout=10)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _naive(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(tzinfo=None)


@pytest.mark.parametrize("name", sorted(SEGMENT_CLIENTS))
def test_segment_protocol_client_stores_identify_track_page_and_dedupes(
        daemon: RunningDaemon, name: str) -> None:
    make, _ = SEGMENT_CLIENTS[name]
    uid, anon = f"{name}-u1", f"{name}-anon-1"
    errors: list[object] = []
    client = make(write_key=API_SECRET, host=daemon.base_url, upload_interval=0.05,
                  on_error=lambda e, batch: errors.append(e))
    client.track(anonymous_id=anon, event="Visited", properties={"path": "/"})
    client.flush()  # stored anonymously before the identify links it
    client.identify(user_id=uid, anonymous_id=anon,
                    traits={"email": f"{name}@example.com", "plan": "pro"})
    for _ in range(2):  # a retry of the same message, in its own request: stored once
        client.track(user_id=uid, event="Order Completed", message_id=f"{name}-order-1",
                     properties={"total": 42.5, "items": ["a", "b"]}, timestamp=ORDERED_AT)
        client.flush()
    client.page(user_id=uid, name="Pricing", properties={"url": "/pricing"})
    client.flush()
    client.shutdown()
    assert errors == []

    user = _user(daemon, uid)
    assert user["email"] == f"{name}@example.com"
    assert user["attributes"]["plan"] == "pro"
    assert store_rows(daemon.store_url, sa.select(anonymous_links.c.user_id).where(
        anonymous_links.c.anonymous_id == anon)) == [{"user_id": uid}]
    visited = _events(daemon, events.c.anonymous_id == anon)
    assert [(e["name"], e["user_id"]) for e in visited] == [("Visited", uid)]
    orders = _events(daemon, (events.c.user_id == uid) & (events.c.name == "Order Completed"))
    assert len(orders) == 1
    assert {k: orders[0]["attributes"][k] for k in ("total", "items")} == {
        "total": 42.5, "items": ["a", "b"]}
    assert abs(orders[0]["created_at"] - _naive(ORDERED_AT)) < SKEW
    pages = _events(daemon, (events.c.user_id == uid) & (events.c.name == "$page"))
    assert [(p["attributes"]["name"], p["attributes"]["url"]) for p in pages] == [
        ("Pricing", "/pricing")]


@pytest.mark.parametrize("name", sorted(SEGMENT_CLIENTS))
def test_segment_protocol_client_signup_time_comes_from_created_at(
        daemon: RunningDaemon, name: str) -> None:
    make, _ = SEGMENT_CLIENTS[name]
    client = make(write_key=API_SECRET, host=daemon.base_url, sync_mode=True)
    client.identify(user_id=f"{name}-old", traits={"createdAt": SIGNED_UP})
    rows = store_rows(daemon.store_url, sa.select(users.c.created_at).where(
        users.c.id == f"{name}-old"))
    assert rows == [{"created_at": dt.datetime(2025, 6, 1, 12)}]


@pytest.mark.parametrize("name", sorted(SEGMENT_CLIENTS))
def test_segment_protocol_client_reads_the_error_reply_of_a_wrong_key(
        daemon: RunningDaemon, name: str) -> None:
    make, api_error = SEGMENT_CLIENTS[name]
    client = make(write_key="wrong", host=daemon.base_url, sync_mode=True, max_retries=0)
    with pytest.raises(api_error) as refused:  # not KeyError: code and message are read
        client.track(user_id=f"{name}-nobody", event="x")
    error: Any = refused.value
    assert error.status == 401
    assert isinstance(error.code, str)
    assert error.code != "unknown"  # what the SDKs say when they cannot read the body
    assert error.message
    assert _events(daemon, events.c.user_id == f"{name}-nobody") == []


def _track_v1(d: RunningDaemon) -> CustomerIO:
    cio = CustomerIO(site_id=KEY_NAME, api_key=API_SECRET, retries=0)
    cio.base_url = f"{d.base_url}/api/v1"  # the host: the library otherwise speaks https only
    return cio


def test_customerio_track_api_identify_track_pageview_and_dedupe(daemon: RunningDaemon) -> None:
    cio = _track_v1(daemon)
    cio.identify(id="cio-1", email="cio1@example.com", plan="basic",
                 created_at=1717243200)  # 2024-06-01 12:00 UTC: the signup time
    for _ in range(2):
        cio.track(customer_id="cio-1", name="purchase", data={"amount": 10}, id="cio-p1",
                  timestamp=int(ORDERED_AT.timestamp()))
    cio.pageview(customer_id="cio-1", page="https://example.com/pricing")
    user = _user(daemon, "cio-1")
    assert (user["email"], user["attributes"]["plan"]) == ("cio1@example.com", "basic")
    assert store_rows(daemon.store_url, sa.select(users.c.created_at).where(
        users.c.id == "cio-1")) == [{"created_at": dt.datetime(2024, 6, 1, 12)}]
    bought = _events(daemon, (events.c.user_id == "cio-1") & (events.c.name == "purchase"))
    assert [(e["attributes"]["amount"], e["created_at"]) for e in bought] == [
        (10, _naive(ORDERED_AT))]
    pages = _events(daemon, (events.c.user_id == "cio-1") & (events.c.name == "$page"))
    assert [p["attributes"]["url"] for p in pages] == ["https://example.com/pricing"]


def test_customerio_track_api_devices(daemon: RunningDaemon) -> None:
    cio = _track_v1(daemon)
    cio.identify(id="cio-dev", email="dev@example.com")
    cio.add_device(customer_id="cio-dev", device_id="tok-ios-1", platform="ios",
                   last_used=int(ORDERED_AT.timestamp()))
    cio.add_device(customer_id="cio-dev", device_id="tok-android-1", platform="android")
    devices = {d["id"]: d for d in _user(daemon, "cio-dev")["devices"]}
    assert {t: d["platform"] for t, d in devices.items()} == {
        "tok-ios-1": "ios", "tok-android-1": "android"}
    assert dt.datetime.fromisoformat(devices["tok-ios-1"]["last_used"]) == ORDERED_AT
    cio.delete_device(customer_id="cio-dev", device_id="tok-ios-1")
    assert [d["id"] for d in _user(daemon, "cio-dev")["devices"]] == ["tok-android-1"]


def test_customerio_track_api_suppress_and_unsuppress(daemon: RunningDaemon) -> None:
    cio = _track_v1(daemon)
    cio.identify(id="cio-sup", email="Sup@Example.com")
    listed = sa.select(suppressions.c.address).where(
        suppressions.c.address == "sup@example.com")
    cio.suppress(customer_id="cio-sup")
    assert store_rows(daemon.store_url, listed) == [{"address": "sup@example.com"}]
    cio.unsuppress(customer_id="cio-sup")
    assert store_rows(daemon.store_url, listed) == []


def test_customerio_track_api_merge_customers(daemon: RunningDaemon) -> None:
    cio = _track_v1(daemon)
    cio.identify(id="cio-primary", email="primary@example.com", plan="gold")
    cio.identify(id="cio-secondary", email="secondary@example.com", city="Oslo")
    cio.track(customer_id="cio-secondary", name="login", id="cio-login-1")
    cio.merge_customers(primary_id_type="id", primary_id="cio-primary",
                        secondary_id_type="id", secondary_id="cio-secondary")
    primary = _user(daemon, "cio-primary")
    assert primary["email"] == "primary@example.com"
    assert (primary["attributes"]["plan"], primary["attributes"]["city"]) == ("gold", "Oslo")
    assert [e["name"] for e in _events(daemon, events.c.user_id == "cio-primary")] == ["login"]
    assert _events(daemon, events.c.user_id == "cio-secondary") == []
    gone = httpx.get(f"{daemon.base_url}/v1/users/cio-secondary", headers=BEARER, timeout=10)
    assert gone.status_code == 404


def test_customerio_app_api_send_email_goes_through_the_outbox(daemon: RunningDaemon) -> None:
    _track_v1(daemon).identify(id="cio-mail", email="mail@example.com", name="Ann")
    api = APIClient(key=API_SECRET, url=daemon.base_url, retries=0)
    sent = api.send_email(SendEmailRequest(
        transactional_message_id="welcome", identifiers={"id": "cio-mail"},
        to="mail@example.com", message_data={"code": "X-1234"}))
    assert sent["delivery_id"]
    outbox = daemon.config_path.parent / "var" / "outbox"
    deadline = time.monotonic() + SEND_TIMEOUT
    files: list[Path] = []
    while not files and time.monotonic() < deadline:
        files = sorted(outbox.glob("*.eml")) if outbox.exists() else []
        time.sleep(0.1)
    assert len(files) == 1, f"no email in {outbox} within {SEND_TIMEOUT} s"
    mail = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert (mail["To"], mail["Subject"]) == ("mail@example.com", "Welcome Ann")
    body = mail.get_body(preferencelist=("plain",))
    assert body is not None
    assert "Your code is X-1234" in body.get_content()
