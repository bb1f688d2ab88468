"""The send routes (``POST /v1/send/email``, ``POST /v1/send/{template}``) and key scopes,
on a real store (SQLite and MariaDB): the ingest routes through httpx.ASGITransport, the
messages delivered by the real delivery service to a scripted provider."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
import sqlalchemy as sa
from delivery_harness import (
    NOW,
    ScriptedProvider,
    add_user,
    load_test_app,
    parse,
    write_app,
    write_config,
)

from segflowd.bus import Bus
from segflowd.client import SegflowAPIError, SegflowClient
from segflowd.config import load_config
from segflowd.delivery.service import DeliveryService
from segflowd.http import Router
from segflowd.ingest.service import IngestService
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import messages, subscriptions, suppressions, users
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

ALL, TRACK, APP = "secret-all", "secret-track", "secret-app"
KEYS = f"""
[[http.keys]]
name = "server"
secret = "{ALL}"
[[http.keys]]
name = "browser"
secret = "{TRACK}"
scope = "track"
[[http.keys]]
name = "mailer"
secret = "{APP}"
scope = "app"
"""
WAIT = 10.0  # seconds, at most, for the bus-driven retention clean-up to happen


@dataclasses.dataclass
class H:
    http: httpx.AsyncClient
    store: Store
    delivery: DeliveryService
    provider: ScriptedProvider
    ingest: IngestService
    router: Router

    async def messages(self) -> list[sa.RowMapping]:
        async with self.store.connect() as conn:
            return list((await conn.execute(sa.select(messages).order_by(messages.c.id))
                         ).mappings())

    async def send(self, body: dict[str, object], key: str = APP,
                   **headers: str) -> httpx.Response:
        return await self.http.post("/v1/send/email", json=body,
                                    headers={"Authorization": f"Bearer {key}", **headers})


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> AsyncIterator[H]:
    app_path = write_app(tmp_path)
    with app_path.open("a") as f:
        f.write('app.transaction("order_receipt", event="order", template="receipt")\n')
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text() + KEYS)
    config = load_config(cfg, environ={})
    kernel = Kernel(config=config, app=load_test_app(app_path), store=store,
                    clock=FakeClock(NOW), bus=Bus(), metrics=Metrics())
    provider = ScriptedProvider()
    delivery = DeliveryService(kernel, providers={"scripted": provider})  # type: ignore[dict-item]
    ingest = IngestService(kernel, wakers=[delivery])
    router = Router()
    ingest.register_routes(router)
    async with anyio.create_task_group() as tg:
        await tg.start(ingest.run)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router),
                                     base_url="http://segflow") as http:
            yield H(http, store, delivery, provider, ingest, router)
        await ingest.drain()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def basic(user: str, password: str = "") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def error(response: httpx.Response) -> dict[str, str]:
    return dict(response.json()["error"])


# -- scopes -------------------------------------------------------------------------


async def test_track_key_writes_through_tracking_routes_only(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    ok = await h.http.post("/v1/track", headers=basic(TRACK),
                           json={"userId": "u1", "event": "Clicked"})
    assert ok.status_code == 200
    ok = await h.http.put("/api/v1/customers/u1", headers=basic("browser", TRACK),
                          json={"plan": "pro"})
    assert ok.status_code == 200
    refused = [
        await h.http.get("/v1/users/u1", headers=bearer(TRACK)),
        await h.http.delete("/v1/users/u1", headers=bearer(TRACK)),
        await h.http.put("/v1/users/u1", headers=bearer(TRACK), json={"attributes": {}}),
        await h.http.post("/v1/users/u1/events", headers=bearer(TRACK), json={"name": "x"}),
        await h.http.delete("/api/v1/customers/u1", headers=basic("browser", TRACK)),
        await h.send({"transactional_message_id": "receipt", "identifiers": {"id": "u1"}},
                     key=TRACK),
        await h.http.post("/v1/send/receipt", headers=bearer(TRACK), json={"user_id": "u1"}),
        # Customer.io routes that delete, suppress or merge someone: not a public key's
        await h.http.delete("/api/v1/customers/u1/devices/tok", headers=basic("browser", TRACK)),
        await h.http.post("/api/v1/customers/u1/suppress", headers=basic("browser", TRACK)),
        await h.http.post("/api/v1/customers/u1/unsuppress", headers=basic("browser", TRACK)),
        await h.http.post("/api/v1/merge_customers", headers=basic("browser", TRACK),
                          json={"primary": {"id": "u1"}, "secondary": {"id": "u2"}}),
        await h.http.post("/api/v2/batch", headers=basic("browser", TRACK), json={"batch": [
            {"type": "person", "action": "identify", "identifiers": {"id": "u3"}},
            {"type": "person", "action": "delete", "identifiers": {"id": "u1"}}]}),
    ]
    for r in refused:
        assert r.status_code == 403, r.request.url
        assert r.headers["content-type"].startswith("application/json")
        assert error(r)["code"] == "forbidden"
        assert "'browser'" in error(r)["message"]
    async with h.store.connect() as conn:
        user = (await conn.execute(sa.select(users).where(users.c.id == "u1"))).mappings().one()
    assert user["attributes"]["plan"] == "pro"  # the track write held, the deletes did not
    assert await h.messages() == []
    async with h.store.connect() as conn:  # the refused batch wrote none of its items
        assert (await conn.execute(sa.select(users.c.id).where(users.c.id == "u3"))).all() == []
    # A v2 batch that only writes is a tracking call.
    ok = await h.http.post("/api/v2/batch", headers=basic("browser", TRACK), json={"batch": [
        {"type": "person", "action": "identify", "identifiers": {"id": "u3"},
         "attributes": {"plan": "free"}}]})
    assert ok.status_code == 200, ok.text


async def test_app_key_sends_but_neither_tracks_nor_reads(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    sent = await h.send({"transactional_message_id": "receipt", "identifiers": {"id": "u1"},
                         "message_data": {"amount": "5 EUR"}})
    assert sent.status_code == 200
    for r in (await h.http.post("/v1/track", headers=basic(APP),
                                json={"userId": "u1", "event": "x"}),
              await h.http.put("/api/v1/customers/u1", headers=basic("mailer", APP), json={}),
              await h.http.get("/v1/users/u1", headers=bearer(APP))):
        assert r.status_code == 403
        assert error(r)["code"] == "forbidden"


async def test_all_key_may_do_everything_and_bad_keys_are_401(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    assert (await h.http.post("/v1/track", headers=basic(ALL),
                              json={"userId": "u1", "event": "x"})).status_code == 200
    assert (await h.http.get("/v1/users/u1", headers=bearer(ALL))).status_code == 200
    assert (await h.send({"transactional_message_id": "receipt",
                          "identifiers": {"id": "u1"}}, key=ALL)).status_code == 200
    assert (await h.http.post("/v1/send/receipt", headers=bearer(ALL),
                              json={"user_id": "u1"})).status_code == 202
    assert (await h.http.delete("/api/v1/customers/u1",
                                headers=basic("server", ALL))).status_code == 200
    assert (await h.send({"transactional_message_id": "receipt", "to": "a@example.com"},
                         key="nope")).status_code == 401


# -- the App API --------------------------------------------------------------------


async def test_app_api_send_is_queued_then_delivered_by_the_outbox(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    r = await h.send({"transactional_message_id": "receipt", "identifiers": {"id": "u1"},
                      "message_data": {"amount": "5 EUR"}})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"delivery_id", "queued_at"}
    (row,) = await h.messages()
    assert body["delivery_id"] == str(row["id"])
    assert body["queued_at"] == int(NOW.replace(tzinfo=dt.UTC).timestamp())
    assert (row["kind"], row["template"], row["user_id"], row["status"]) == (
        "transaction", "receipt", "u1", "queued")
    assert row["data"] == {"amount": "5 EUR"}
    assert await h.delivery.run_once() == 1
    (msg,) = h.provider.sent
    assert msg.to == "ann@example.com"
    assert b"Receipt for Ann: 5 EUR" in msg.mime
    assert b"List-Unsubscribe" not in msg.mime  # transactional mail
    assert (await h.messages())[0]["status"] == "sent"


async def test_subject_and_body_overrides_are_rendered_sandboxed(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    r = await h.send({"transactional_message_id": "receipt", "identifiers": {"id": "u1"},
                      "message_data": {"amount": "<b>5</b>"},
                      "subject": "Paid: {{ amount }} & thanks, {{ user.name }}",
                      "body": "<p>Dear {{ user.name }}, you paid {{ amount }}.</p>"})
    assert r.status_code == 200, r.text
    assert await h.delivery.run_once() == 1
    (msg,) = h.provider.sent
    mail = parse(msg.mime)
    assert mail["Subject"] == "Paid: <b>5</b> & thanks, Ann"  # a subject is text
    html = mail.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "Dear Ann, you paid &lt;b&gt;5&lt;/b&gt;." in html  # the body is escaped HTML
    assert "Receipt for" not in html
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Dear Ann, you paid <b>5</b>." in text
    # A body that reaches for Python's internals renders nothing: the message fails.
    r = await h.send({"transactional_message_id": "receipt", "identifiers": {"id": "u1"},
                      "body": "{{ user.__class__.__mro__[1].__subclasses__() }}"})
    assert r.status_code == 200
    assert await h.delivery.run_once() == 1
    row = (await h.messages())[-1]
    assert row["status"] == "failed"
    assert "not allowed" in row["last_error"] or "undefined" in row["last_error"]
    assert len(h.provider.sent) == 1


async def test_an_event_cannot_override_a_transactional_template(h: H) -> None:
    """The overrides' key in data from anywhere but a send (an event's attributes) is
    ignored: the template's own subject and body go out."""
    from segflowd.delivery.outbox import enqueue
    from segflowd.delivery.templates import OVERRIDES

    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    async with h.store.begin() as conn:
        await enqueue(conn, kind="transaction", template="receipt", now=NOW, user_id="u1",
                      dedupe_key="tx:1:order_receipt", data={
                          "amount": "1", OVERRIDES: {"subject": "Phish", "body": "<p>x</p>"}})
    assert await h.delivery.run_once() == 1
    (msg,) = h.provider.sent
    assert parse(msg.mime)["Subject"] == "Your receipt"
    assert b"Receipt for Ann: 1" in msg.mime


async def test_a_transaction_name_and_a_to_address(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    r = await h.send({"transactional_message_id": "order_receipt", "to": "Ann <a2@example.com>",
                      "identifiers": {"email": "ann@example.com"},
                      "message_data": {"amount": "7"}})
    assert r.status_code == 200, r.text
    (row,) = await h.messages()
    assert (row["transaction"], row["template"], row["user_id"]) == (
        "order_receipt", "receipt", "u1")
    await h.delivery.run_once()
    assert [m.to for m in h.provider.sent] == ["Ann <a2@example.com>"]


async def test_an_unknown_email_identifier_is_mailed_as_the_address(h: H) -> None:
    r = await h.send({"transactional_message_id": "headline",
                      "identifiers": {"email": "new@example.com"},
                      "message_data": {"headline": "Hi"}})
    assert r.status_code == 200, r.text
    (row,) = await h.messages()
    assert (row["user_id"], row["to_address"]) == (None, "new@example.com")


async def test_the_suppression_list_holds_for_sends(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    async with h.store.begin() as conn:
        await conn.execute(sa.insert(suppressions).values(
            address="ann@example.com", reason="bounce", created_at=NOW))
    r = await h.send({"transactional_message_id": "receipt", "identifiers": {"id": "u1"},
                      "message_data": {"amount": "1"}, "send_to_unsubscribed": True})
    assert r.status_code == 200
    await h.delivery.run_once()
    assert h.provider.sent == []
    assert (await h.messages())[0]["status"] == "suppressed"


async def test_send_to_unsubscribed(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    async with h.store.begin() as conn:
        await conn.execute(sa.insert(subscriptions).values(
            user_id="u1", topic="marketing", unsubscribed_at=NOW, updated_at=NOW))
    base = {"transactional_message_id": "receipt", "identifiers": {"id": "u1"},
            "message_data": {"amount": "1"}}
    assert (await h.send(base)).status_code == 200  # default true: sent all the same
    assert (await h.send({**base, "send_to_unsubscribed": False})).status_code == 200
    _, second = await h.messages()
    assert second["status"] == "suppressed"
    assert "send_to_unsubscribed" in second["last_error"]
    await h.delivery.run_once()
    assert len(h.provider.sent) == 1
    assert [r["status"] for r in await h.messages()] == ["sent", "suppressed"]


async def test_disable_message_retention_empties_the_data_once_sent(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    r = await h.send({"transactional_message_id": "receipt", "identifiers": {"id": "u1"},
                      "message_data": {"amount": "secret-code-42"},
                      "disable_message_retention": True})
    assert r.status_code == 200
    await h.delivery.run_once()
    assert b"secret-code-42" in h.provider.sent[0].mime
    with anyio.fail_after(WAIT):
        while (await h.messages())[0]["data"]:  # noqa: ASYNC110 - a row in the store, no event
            await anyio.sleep(0.02)
    assert (await h.messages())[0]["status"] == "sent"


async def test_idempotency_key_queues_once(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    body = {"transactional_message_id": "receipt", "identifiers": {"id": "u1"},
            "message_data": {"amount": "1"}}
    a = await h.send(body, **{"Idempotency-Key": "order-9"})
    b = await h.send(body, **{"Idempotency-Key": "order-9"})
    c = await h.send(body)
    assert a.json()["delivery_id"] == b.json()["delivery_id"] != c.json()["delivery_id"]
    assert len(await h.messages()) == 2


BAD: list[tuple[dict[str, object], str]] = [
    ({"transactional_message_id": "nope", "to": "a@example.com"}, "transactional_message_id"),
    ({"to": "a@example.com"}, "transactional_message_id"),
    ({"transactional_message_id": "receipt"}, "identifiers"),
    ({"transactional_message_id": "receipt", "to": "not an address"}, "to"),
    ({"transactional_message_id": "receipt", "identifiers": {"id": "ghost"}}, "identifiers.id"),
    ({"transactional_message_id": "receipt", "identifiers": {"cio_id": "1"}},
     "identifiers.cio_id"),
    ({"transactional_message_id": "receipt", "to": "a@example.com", "message_data": [1]},
     "message_data"),
    ({"transactional_message_id": "receipt", "to": "a@example.com", "subject": "{{ x"},
     "subject"),
    ({"transactional_message_id": "receipt", "to": "a@example.com", "body": ""}, "body"),
    ({"transactional_message_id": "receipt", "to": "a@example.com", "body": 5}, "body"),
    ({"transactional_message_id": "receipt", "to": "a@example.com", "bcc": "b@example.com"},
     "bcc"),
    ({"transactional_message_id": "receipt", "to": "a@example.com",
      "send_to_unsubscribed": "no"}, "send_to_unsubscribed"),
]


async def test_bad_input_is_a_400_naming_the_field_and_writes_nothing(h: H) -> None:
    # One store for all the cases: a case that wrote anything would show in the next.
    for body, field in BAD:
        r = await h.send(body)
        assert r.status_code == 400, (body, r.text)
        assert error(r)["message"].startswith(f"{field}:"), (body, r.text)
        assert await h.messages() == []


async def test_a_body_over_the_limit_is_413(h: H) -> None:
    big = {"transactional_message_id": "receipt", "to": "a@example.com",
           "message_data": {"x": "y" * 600_000}}
    r = await h.http.post("/v1/send/email", content=json.dumps(big), headers={
        **bearer(APP), "Content-Type": "application/json"})
    assert r.status_code == 413
    assert await h.messages() == []


# -- the native route and client.send -----------------------------------------------


async def test_native_send_route_answers_the_message_and_its_status(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    r = await h.http.post("/v1/send/receipt", headers=bearer(APP),
                          json={"user_id": "u1", "data": {"amount": "3"}})
    assert r.status_code == 202
    (row,) = await h.messages()
    assert r.json() == {"message": row["id"], "status": "queued", "duplicate": False}
    bad = await h.http.post("/v1/send/receipt", headers=bearer(APP), json={"data": {}})
    assert bad.status_code == 400
    assert error(bad)["message"].startswith("user_id:")
    bad = await h.http.post("/v1/send/nope", headers=bearer(APP), json={"user_id": "u1"})
    assert bad.status_code == 400
    assert error(bad)["message"].startswith("template:")


async def test_client_send_queues_and_the_outbox_delivers(h: H) -> None:
    await add_user(h.store, "u1", "ann@example.com", name="Ann")
    await add_user(h.store, "u2", "robert@example.com", name="Bob")
    transport = httpx.ASGITransport(app=h.router)
    async with SegflowClient("http://segflow", APP, transport=transport) as sf:
        mid = await sf.send("receipt", user_id="u1", data={"amount": "9"},
                            idempotency_key="k1")
        again = await sf.send("receipt", user_id="u1", data={"amount": "9"},
                              idempotency_key="k1")
        other = await sf.send("headline", user_id="u2", to="bob@example.com",
                              data={"headline": "Hello Bob", "amount": "1"})
        with pytest.raises(SegflowAPIError) as info:
            await sf.send("missing", user_id="u1")
    assert mid == again != other
    assert (info.value.status, info.value.code) == (400, "invalid_field")
    await h.delivery.run_once()
    assert sorted(m.to for m in h.provider.sent) == ["ann@example.com", "bob@example.com"]

