"""openapi.yaml against the running daemon: schemathesis drives every native operation.

Each operation gets a fresh segflowd process (SQLite store) and a bounded, derandomized
run; every response must be a non-5xx whose status, content type and body are the ones
openapi.yaml documents for that operation. A scripted happy path then checks the
success bodies (a user in a segment and a campaign) that random ids rarely reach.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from daemon_harness import API_SECRET, StartDaemon
from hypothesis import HealthCheck, settings
from schemathesis import checks

pytestmark = pytest.mark.slow

SPEC = Path(__file__).resolve().parents[2] / "openapi.yaml"
MAX_EXAMPLES = 25  # per operation: keeps the whole file well under a minute
AUTH = {"Authorization": f"Bearer {API_SECRET}"}
# The Segment routes take the key by Basic auth (as Segment's write key) instead.
SEGMENT_AUTH = {"Authorization": "Basic " + base64.b64encode(f"{API_SECRET}:".encode()).decode()}
# The Customer.io Track routes: Basic with the key's name (site id) and secret (API key).
CIO_AUTH = {"Authorization": "Basic "
            + base64.b64encode(f"default:{API_SECRET}".encode()).decode()}
CIO_TRACK_OPERATIONS = [
    ("DELETE", "/api/v1/customers/{id}/devices/{token}"),
    ("POST", "/api/v1/customers/{id}/{change}"), ("POST", "/api/v1/merge_customers"),
    ("POST", "/api/v1/push/events"), ("POST", "/api/v2/{route}"),
    ("PUT", "/api/v1/customers/{id}/devices"),
]
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
SEGMENT_TIMEOUT = 20.0  # seconds for a new user to show up in a segment and a campaign

# A segment of everyone and a campaign that waits: GET /v1/users/{id} then lists both.
APP = """\
import sqlalchemy as sa
from segflowd import Segflow
from segflowd.schema import users

app = Segflow()


@app.segment("everyone")
def everyone():
    return sa.select(users.c.id)


@app.campaign("hold", segments=["everyone"])
def hold(ctx, rt):
    yield rt.wait(days=1)
"""

# A template for the send routes' examples (its file is the shipped layout).
SEND_APP = """\
from segflowd import Segflow
from segflowd.delivery.templates import COMPONENTS_DIR

app = Segflow(templates=COMPONENTS_DIR)
app.template("welcome", subject="Welcome", html="layout.html")
"""

schema = schemathesis.openapi.from_path(SPEC)


@dataclasses.dataclass
class Target:
    base_url: str
    statuses: list[int] = dataclasses.field(default_factory=list)


@pytest.fixture
def target(start_daemon: StartDaemon, sqlite_url: str) -> Iterator[Target]:
    t = Target(start_daemon(store_url=sqlite_url, app=SEND_APP).base_url)
    yield t
    # Schemathesis drops the key on purpose in some calls; most must get past it, or
    # the run would only have tested the refusal.
    assert t.statuses, "schemathesis made no calls"
    assert t.statuses.count(401) < len(t.statuses) / 2
    assert any(s in (200, 202, 204, 404) for s in t.statuses)


def test_the_spec_is_valid_openapi_and_documents_every_native_route_and_health() -> None:
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = sorted((op.ok().method.upper(), op.ok().path)
                        for op in schema.get_all_operations())
    assert operations == sorted([
        *CIO_TRACK_OPERATIONS,
        ("DELETE", "/v1/users/{id}"), ("GET", "/healthz"), ("GET", "/v1/users/{id}"),
        ("OPTIONS", "/v1/{route}"), ("POST", "/v1/send/email"),
        ("POST", "/v1/send/{template}"), ("POST", "/v1/users/{id}/events"),
        ("GET", "/v1/users/{id}/subscriptions"), ("PUT", "/v1/users/{id}/subscriptions"),
        ("POST", "/v1/{route}"), ("PUT", "/v1/users/{id}"),
    ])


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_daemon_answers_as_openapi_yaml_documents(case: schemathesis.Case,
                                                  target: Target) -> None:
    auth = SEGMENT_AUTH if case.path == "/v1/{route}" else AUTH
    if case.path.startswith("/api/"):
        auth = CIO_AUTH
    response = case.call_and_validate(base_url=target.base_url, headers=auth, checks=CHECKS)
    target.statuses.append(response.status_code)


def _validated(base_url: str, path: str, method: str, *, expect: int,
               **kwargs: object) -> schemathesis.Response:
    case = schema[path][method].Case(**kwargs)  # type: ignore[arg-type]
    response = case.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS)
    assert response.status_code == expect, response.text
    return response


def test_success_and_error_bodies_of_a_whole_user_lifecycle_match_the_spec(
        start_daemon: StartDaemon, sqlite_url: str) -> None:
    base = start_daemon(store_url=sqlite_url, app=APP).base_url
    users, events = "/v1/users/{id}", "/v1/users/{id}/events"
    _validated(base, "/healthz", "GET", expect=200)
    _validated(base, users, "PUT", expect=200, path_parameters={"id": "ann-1"},
               body={"attributes": {"email": "ann@example.com", "plan": "pro"}})
    first = _validated(base, events, "POST", expect=202, path_parameters={"id": "ann-1"},
                       body={"name": "signed_up", "id": "e-1",
                             "timestamp": "2026-01-02T03:04:05+01:00"}).json()
    again = _validated(base, events, "POST", expect=202, path_parameters={"id": "ann-1"},
                       body={"name": "signed_up", "id": "e-1"}).json()
    assert again == {"id": first["id"], "duplicate": True}
    deadline = time.monotonic() + SEGMENT_TIMEOUT
    while True:
        user = _validated(base, users, "GET", expect=200, path_parameters={"id": "ann-1"}).json()
        settled = user["campaigns"] and all(c["status"] != "running"
                                            for c in user["campaigns"])  # stepped to its wait
        if (user["segments"] and settled) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [s["segment"] for s in user["segments"]] == ["everyone"]
    assert [(c["campaign"], c["status"]) for c in user["campaigns"]] == [("hold", "waiting")]
    assert user["email"] == "ann@example.com"
    _validated(base, events, "POST", expect=400, path_parameters={"id": "ann-1"},
               body={"attributes": {}})
    _validated(base, users, "DELETE", expect=200, path_parameters={"id": "ann-1"})
    _validated(base, users, "GET", expect=404, path_parameters={"id": "ann-1"})
    _validated(base, users, "PUT", expect=413, path_parameters={"id": "big"},
               body={"attributes": {"blob": "x" * 40_000}})
