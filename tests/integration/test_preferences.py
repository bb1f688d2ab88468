"""Topics at delivery and on the preference page: a one-click unsubscribe turns off the
message's topic only, the page lists every topic and changes nothing on a GET, its form
saves the choices, and "unsubscribe from all" stops every campaign message. Both stores."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
import sqlalchemy as sa
from delivery_harness import ScriptedProvider, Setup, add_user, make_kernel, message_row, parse
from delivery_harness import service as delivery_service

from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.http import Router
from segflowd.ingest.service import IngestService
from segflowd.schema import subscriptions
from segflowd.store import Store

pytestmark = pytest.mark.anyio

API_KEY = "topics-test-key"
KEYS = f'\n[[http.keys]]\nname = "site"\nsecret = "{API_KEY}"\n'
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FORM = {"content-type": "application/x-www-form-urlencoded"}


@dataclasses.dataclass
class Env:
    setup: Setup
    svc: DeliveryService
    provider: ScriptedProvider
    http: httpx.AsyncClient

    async def send(self, template: str = "welcome", *, topic: str | None = None,
                   kind: str = "campaign", user: str = "u1") -> int:
        async with self.setup.kernel.store.begin() as conn:
            mid = await enqueue(
                conn, kind=kind, template=template,  # type: ignore[arg-type]
                now=self.setup.clock.now(), user_id=user, dedupe_key=None,
                data={"plan": "pro", "amount": "1"}, topic=topic)
        assert mid is not None
        await self.svc.run_once()
        return mid

    async def status(self, mid: int) -> tuple[str, str | None]:
        row = await message_row(self.setup.kernel.store, mid)
        return row["status"], row["last_error"]

    def unsubscribe_path(self) -> str:
        """The path of the List-Unsubscribe URL of the last message sent."""
        link = parse(self.provider.sent[-1].mime)["List-Unsubscribe"].split(">")[0]
        return urlsplit(link.lstrip("<")).path

    async def off(self, user: str = "u1") -> dict[str, bool]:
        """The user's rows: topic -> unsubscribed."""
        async with self.setup.kernel.store.connect() as conn:
            rows = (await conn.execute(sa.select(
                subscriptions.c.topic, subscriptions.c.unsubscribed_at).where(
                subscriptions.c.user_id == user))).all()
        return {str(t): at is not None for t, at in rows}


@pytest.fixture
async def env(store: Store, tmp_path: Path) -> AsyncIterator[Env]:
    setup = make_kernel(store, tmp_path, email_extra=KEYS)
    app = setup.kernel.app
    app.topic("newsletter", title="News & <Letters>", description="Once a week")
    app.topic("offers", title="Offers")
    await add_user(store, "u1", "ann@example.org", name="Ann")
    provider = ScriptedProvider()
    svc = delivery_service(setup, provider)
    ingest = IngestService(setup.kernel)
    router = Router()
    svc.register_routes(router)
    ingest.register_routes(router)
    async with anyio.create_task_group() as tg:
        await tg.start(ingest.run)
        transport = httpx.ASGITransport(app=router)
        async with httpx.AsyncClient(transport=transport,
                                     base_url="https://mail.example.com") as http:
            yield Env(setup, svc, provider, http)
        await ingest.drain()


async def test_one_click_turns_off_the_message_topic_only(env: Env) -> None:
    await env.send(topic="newsletter")
    r = await env.http.post(env.unsubscribe_path(), content=b"List-Unsubscribe=One-Click",
                            headers=FORM)
    assert r.status_code == 200
    assert "News &amp; &lt;Letters&gt;" in r.text
    assert await env.off() == {"newsletter": True}
    news = await env.send(topic="newsletter")
    plain = await env.send()
    offers = await env.send(topic="offers")
    receipt = await env.send("receipt", kind="transaction")
    assert await env.status(news) == ("suppressed", "user unsubscribed from topic 'newsletter'")
    assert (await env.status(plain))[0] == "sent"
    assert (await env.status(offers))[0] == "sent"
    assert (await env.status(receipt))[0] == "sent"


async def test_one_click_on_a_message_without_topic_unsubscribes_from_all(env: Env) -> None:
    await env.send()
    r = await env.http.post(env.unsubscribe_path())
    assert r.status_code == 200
    assert "no more marketing email" in r.text
    assert await env.off() == {"marketing": True}
    news, plain = await env.send(topic="newsletter"), await env.send()
    receipt = await env.send("receipt", kind="transaction")
    assert await env.status(news) == ("suppressed", "user unsubscribed from marketing messages")
    assert (await env.status(plain))[0] == "suppressed"
    assert (await env.status(receipt))[0] == "sent"


async def test_the_page_lists_topics_with_their_state_and_a_get_changes_nothing(
        env: Env) -> None:
    await env.send(topic="offers")
    path = env.unsubscribe_path()
    await env.http.post(path)  # one-click: offers off
    page = await env.http.get(path)
    assert page.status_code == 200
    assert page.headers["cache-control"].startswith("no-store")
    text = page.text
    assert "News &amp; &lt;Letters&gt;" in text  # titles are escaped
    assert "<Letters>" not in text
    assert "Once a week" in text
    assert '<input type="checkbox" name="topic" value="newsletter" checked>' in text
    assert '<input type="checkbox" name="topic" value="offers">' in text
    assert '<input type="checkbox" name="all" value="off">' in text  # not unsubscribed
    assert "Unsubscribe from “Offers”" in text  # the one-click button names its topic
    for _ in range(3):
        await env.http.get(path)
    assert await env.off() == {"offers": True}


async def test_the_form_saves_each_topic_and_all(env: Env) -> None:
    await env.send(topic="newsletter")
    path = env.unsubscribe_path()
    # newsletter unticked, offers ticked: newsletter off
    r = await env.http.post(path, content=b"prefs=1&topic=offers", headers=FORM)
    assert r.status_code == 200
    assert "Your preferences are saved." in r.text
    assert '<input type="checkbox" name="topic" value="newsletter">' in r.text
    assert await env.off() == {"newsletter": True}
    # everything ticked again, and "unsubscribe from all"
    await env.http.post(path, content=b"prefs=1&topic=offers&topic=newsletter&all=off",
                        headers=FORM)
    assert await env.off() == {"newsletter": False, "marketing": True}
    offers = await env.send(topic="offers")
    assert await env.status(offers) == ("suppressed",
                                        "user unsubscribed from marketing messages")
    # nothing ticked at all: still the form (prefs), not a one-click
    await env.http.post(path, content=b"prefs=1", headers=FORM)
    assert await env.off() == {"newsletter": True, "marketing": False, "offers": True}
    plain = await env.send()
    assert (await env.status(plain))[0] == "sent"


async def test_a_forgotten_user_form_writes_nothing(env: Env) -> None:
    await env.send(topic="newsletter")
    path = env.unsubscribe_path()
    r = await env.http.delete("/v1/users/u1", headers=AUTH)
    assert r.status_code == 200
    saved = await env.http.post(path, content=b"prefs=1&all=off", headers=FORM)
    assert saved.status_code == 200
    assert await env.off() == {}


async def test_api_reads_and_writes_subscriptions(env: Env) -> None:
    url = "/v1/users/u1/subscriptions"
    r = await env.http.get(url, headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"user_id": "u1", "all": True,
                        "topics": {"newsletter": True, "offers": True}}
    r = await env.http.put(url, headers=AUTH, json={"topics": {"offers": False}})
    assert r.status_code == 200, r.text
    assert r.json() == {"user_id": "u1", "all": True,
                        "topics": {"newsletter": True, "offers": False}}
    r = await env.http.put(url, headers=AUTH, json={"all": False, "topics": {"offers": True}})
    assert r.json() == {"user_id": "u1", "all": False,
                        "topics": {"newsletter": True, "offers": True}}
    assert await env.off() == {"offers": False, "marketing": True}
    offers = await env.send(topic="offers")
    assert (await env.status(offers))[0] == "suppressed"
    r = await env.http.put(url, headers=AUTH, json={"all": True})
    assert r.json()["all"] is True
    offers = await env.send(topic="offers")
    assert (await env.status(offers))[0] == "sent"


@pytest.mark.parametrize(("body", "field"), [
    ({"topics": {"nope": False}}, "topics.nope"),
    ({"topics": {"offers": "no"}}, "topics.offers"),
    ({"all": 0}, "all"),
    ({"topics": ["offers"]}, "topics"),
    ({"everything": False}, "everything"),
    (["all"], "body"),
])
async def test_api_refuses_a_bad_body_and_writes_nothing(env: Env, body: object,
                                                        field: str) -> None:
    # a valid change first in the same body must not be half-applied
    if isinstance(body, dict) and "topics" in body and isinstance(body["topics"], dict):
        body = {**body, "all": False}
    r = await env.http.put("/v1/users/u1/subscriptions", headers=AUTH, json=body)
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_field"
    assert field in r.json()["message"]
    assert await env.off() == {}


async def test_api_unknown_user_and_no_key(env: Env) -> None:
    url = "/v1/users/nobody/subscriptions"
    assert (await env.http.get(url, headers=AUTH)).status_code == 404
    r = await env.http.put(url, headers=AUTH, json={"all": False})
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"
    assert await env.off("nobody") == {}
    assert (await env.http.get("/v1/users/u1/subscriptions")).status_code == 401
