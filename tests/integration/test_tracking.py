"""Open pixel, click redirects (no open redirect) and unsubscribe, both ways, on both stores."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa
from delivery_harness import ScriptedProvider, Setup, add_user, make_kernel, parse, service

from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.delivery.tokens import Signer
from segflowd.http import Router
from segflowd.schema import engagement, subscriptions
from segflowd.store import Store

pytestmark = pytest.mark.anyio


class Env:
    def __init__(self, setup: Setup, svc: DeliveryService, provider: ScriptedProvider,
                 http: httpx.AsyncClient) -> None:
        self.setup, self.svc, self.provider, self.http = setup, svc, provider, http

    async def send(self, template: str, kind: str = "campaign", **data: object) -> int:
        async with self.setup.kernel.store.begin() as conn:
            mid = await enqueue(
                conn, kind=kind, template=template,  # type: ignore[arg-type]
                now=self.setup.clock.now(), user_id="u1", dedupe_key=None,
                data=data or {"plan": "pro", "amount": "1"})
        assert mid is not None
        await self.svc.run_once()
        return mid

    def html(self) -> str:
        body = parse(self.provider.sent[-1].mime).get_body(("html",))
        assert body is not None
        return str(body.get_content())


@pytest.fixture
async def env(store: Store, tmp_path: Path) -> AsyncIterator[Env]:
    setup = make_kernel(store, tmp_path)
    await add_user(store, "u1", "ann@example.org", name="Ann")
    provider = ScriptedProvider()
    svc = service(setup, provider)
    router = Router()
    svc.register_routes(router)
    transport = httpx.ASGITransport(app=router)
    async with httpx.AsyncClient(transport=transport,
                                 base_url="https://mail.example.com") as http:
        yield Env(setup, svc, provider, http)


def path_of(url: str) -> str:
    return urlsplit(url).path


async def engagements(env: Env) -> list[tuple[str, str | None]]:
    async with env.setup.kernel.store.connect() as conn:
        rows = (await conn.execute(sa.select(engagement.c.kind, engagement.c.url)
                                   .order_by(engagement.c.id))).all()
    return [(r.kind, r.url) for r in rows]


async def test_tracked_message_gets_pixel_and_click_links(env: Env) -> None:
    mid = await env.send("tracked")
    html = env.html()
    pixels = re.findall(r'<img src="(https://mail\.example\.com/t/o/[^"]+)"', html)
    clicks = re.findall(r'href="(https://mail\.example\.com/t/c/[^"]+)"', html)
    assert len(pixels) == 1
    assert len(clicks) == 1
    assert "https://example.com/start" not in re.sub(r"/t/c/[^\"]+", "", html)
    # the unsubscribe link is never rewritten
    assert re.search(r'href="https://mail\.example\.com/u/[^"]+"', html)
    sub = env.setup.kernel.bus.subscribe()
    r = await env.http.get(path_of(pixels[0]))
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/gif"
    r = await env.http.get(path_of(clicks[0]))
    assert r.status_code == 302
    assert r.headers["location"] == "https://example.com/start?ref=welcome&x=1"
    assert await engagements(env) == [
        ("open", None), ("click", "https://example.com/start?ref=welcome&x=1")]
    events, _ = sub.drain()
    assert [(e.kind, e.data["message"]) for e in events] == [
        ("message.opened", mid), ("message.clicked", mid)]


async def test_untracked_template_has_no_pixel_or_redirects(env: Env) -> None:
    await env.send("welcome")
    html = env.html()
    assert "/t/o/" not in html
    assert "/t/c/" not in html
    assert 'href="https://example.com/start?ref=welcome&amp;x=1"' in html


async def test_open_redirect_attempts_are_refused(env: Env) -> None:
    await env.send("tracked")
    click = re.findall(r'href="https://mail\.example\.com(/t/c/[^"]+)"', env.html())[0]
    token = click.rsplit("/", 1)[1]
    _payload, mac = token.split(".")
    forged_signer = Signer("not-the-key")
    attempts = [
        # a token of our own shape, signed with another key, pointing elsewhere
        "/t/c/" + forged_signer.sign("c", {"m": 1, "l": "https://evil.example"}),
        # the real MAC on a different payload
        "/t/c/" + Signer("x").sign("c", {"m": 1, "l": "https://evil.example"}).split(".")[0]
        + "." + mac,
        # a valid token of another purpose (the open pixel's) used as a click
        "/t/c/" + env.svc.signer.sign("o", {"m": 1}),
        # garbage and a redirect target in the query string
        "/t/c/not-a-token", click + "?url=https://evil.example",
    ]
    for path in attempts[:-1]:
        r = await env.http.get(path)
        assert r.status_code == 404, path
        assert "location" not in r.headers
    r = await env.http.get(attempts[-1])  # the query is ignored: the signed URL wins
    assert r.headers["location"] == "https://example.com/start?ref=welcome&x=1"
    assert [k for k, _ in await engagements(env)] == ["click"]


async def test_a_signed_url_that_is_not_web_is_never_a_redirect_target(env: Env) -> None:
    await env.send("tracked")
    token = env.svc.signer.sign("c", {"m": 1, "l": "javascript:alert(1)"})
    r = await env.http.get(f"/t/c/{token}")
    assert r.status_code == 404


async def unsubscribed(env: Env) -> bool:
    async with env.setup.kernel.store.connect() as conn:
        row = (await conn.execute(sa.select(subscriptions.c.unsubscribed_at).where(
            subscriptions.c.user_id == "u1", subscriptions.c.topic == "marketing"))).first()
    return row is not None and row.unsubscribed_at is not None


async def test_unsubscribe_page_then_form_post(env: Env) -> None:
    await env.send("welcome")
    link = parse(env.provider.sent[-1].mime)["List-Unsubscribe"].split(">")[0].lstrip("<")
    page = await env.http.get(path_of(link))
    assert page.status_code == 200
    assert '<form method="post">' in page.text
    assert not await unsubscribed(env)  # a GET (a link scanner) changes nothing
    done = await env.http.post(path_of(link))
    assert done.status_code == 200
    assert "unsubscribed" in done.text
    assert await unsubscribed(env)
    # no more campaign messages; transactional ones still go
    before = len(env.provider.sent)
    await env.send("welcome")
    await env.send("receipt", kind="transaction")
    assert [m.subject for m in env.provider.sent[before:]] == ["Your receipt"]


async def test_rfc8058_one_click_post_unsubscribes(env: Env) -> None:
    await env.send("welcome")
    mime = parse(env.provider.sent[-1].mime)
    assert mime["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = mime["List-Unsubscribe"].split(">")[0].lstrip("<")
    r = await env.http.post(path_of(link), content=b"List-Unsubscribe=One-Click",
                            headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200
    assert await unsubscribed(env)
    again = await env.http.post(path_of(link), content=b"List-Unsubscribe=One-Click")
    assert again.status_code == 200  # idempotent


async def test_forged_unsubscribe_token_is_refused(env: Env) -> None:
    forged = Signer("wrong").sign("u", {"u": "u1", "m": 1})
    assert (await env.http.post(f"/u/{forged}")).status_code == 404
    opener = env.svc.signer.sign("o", {"m": 1})  # right key, wrong purpose
    assert (await env.http.post(f"/u/{opener}")).status_code == 404
    assert not await unsubscribed(env)
