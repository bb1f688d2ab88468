"""Tracking at the edge, on both stores: HEAD and machines are not readers, a hit is
counted on one row, the redirect never waits for the store, HTML pages carry the
security headers."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
import sqlalchemy as sa
from delivery_harness import ScriptedProvider, Setup, add_user, make_kernel, parse, service
from test_ingest import TcpProxy

from segflowd import schema
from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.delivery.tracking import is_machine
from segflowd.errors import StoreUnavailable
from segflowd.flows.reads import engaged
from segflowd.http import Router
from segflowd.schema import engagement
from segflowd.store import Store

pytestmark = pytest.mark.anyio

APPLE_PREFETCH = "Mozilla/5.0"
APPLE_MAIL = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko)")
GMAIL_PROXY = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
               "(via ggpht.com GoogleImageProxy)")
TARGET = "https://example.com/start?ref=welcome&x=1"


class Env:
    def __init__(self, setup: Setup, svc: DeliveryService, provider: ScriptedProvider,
                 http: httpx.AsyncClient) -> None:
        self.setup, self.svc, self.provider, self.http = setup, svc, provider, http
        self.store = setup.kernel.store

    async def send(self, template: str = "tracked") -> int:
        async with self.store.begin() as conn:
            mid = await enqueue(conn, kind="campaign", template=template,
                                now=self.setup.clock.now(), user_id="u1", dedupe_key=None,
                                data={"plan": "pro", "amount": "1"})
        assert mid is not None
        await self.svc.run_once()
        return mid

    def links(self) -> tuple[str, str]:
        """The open pixel's path and the tracked link's path of the last message."""
        body = parse(self.provider.sent[-1].mime).get_body(("html",))
        assert body is not None
        html = str(body.get_content())
        pixel = re.findall(r'<img src="https://mail\.example\.com(/t/o/[^"]+)"', html)[0]
        click = re.findall(r'href="https://mail\.example\.com(/t/c/[^"]+)"', html)[0]
        return pixel, click

    async def rows(self) -> list[dict[str, Any]]:
        e = engagement.c
        async with self.store.connect() as conn:
            got = (await conn.execute(sa.select(
                e.kind, e.url, e.hits, e.machine, e.created_at, e.last_at).order_by(e.id))).all()
        return [dict(r._mapping) for r in got]


@contextlib.asynccontextmanager
async def environment(store: Store, tmp_path: Path) -> AsyncIterator[Env]:
    setup = make_kernel(store, tmp_path)
    await add_user(store, "u1", "ann@example.org", name="Ann")
    provider = ScriptedProvider()
    svc = service(setup, provider)
    router = Router()
    svc.register_routes(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router),
                                 base_url="https://mail.example.com") as http:
        yield Env(setup, svc, provider, http)


@pytest.fixture
async def env(store: Store, tmp_path: Path) -> AsyncIterator[Env]:
    async with environment(store, tmp_path) as e:
        yield e


async def test_head_answers_like_get_and_counts_nothing(env: Env) -> None:
    await env.send()
    pixel, click = env.links()
    sub = env.setup.kernel.bus.subscribe()
    opened = await env.http.head(pixel)
    assert opened.status_code == 200
    assert opened.headers["content-type"] == "image/gif"
    followed = await env.http.head(click)
    assert followed.status_code == 302
    assert followed.headers["location"] == TARGET
    assert await env.rows() == []
    assert sub.drain()[0] == []
    assert not await engaged(env.store, "u1", "tracked", "open")


async def test_repeated_hits_keep_the_first_per_message_and_link_with_a_count(
        env: Env) -> None:
    mid = await env.send()
    pixel, click = env.links()
    first = env.setup.clock.now()
    for _ in range(3):
        assert (await env.http.get(pixel)).status_code == 200
        assert (await env.http.get(click)).status_code == 302
        await env.setup.clock.advance(60)
    rows = await env.rows()
    assert [(r["kind"], r["url"], r["hits"], bool(r["machine"])) for r in rows] == [
        ("open", None, 3, False), ("click", TARGET, 3, False)]
    for r in rows:
        assert r["created_at"] == first
        assert r["last_at"] == first + dt.timedelta(seconds=120)
    # another link of the same message is a row of its own
    other = env.svc.signer.sign("c", {"m": mid, "l": "https://example.com/other"})
    assert (await env.http.get(f"/t/c/{other}")).status_code == 302
    assert [(r["url"], r["hits"]) for r in await env.rows()] == [
        (None, 3), (TARGET, 3), ("https://example.com/other", 1)]


async def test_machine_opens_are_marked_and_do_not_make_rt_opened_true(env: Env) -> None:
    mid = await env.send()
    pixel, click = env.links()
    sub = env.setup.kernel.bus.subscribe()
    for agent in (APPLE_PREFETCH, APPLE_PREFETCH):
        assert (await env.http.get(pixel, headers={"user-agent": agent})).status_code == 200
    scanner = {"user-agent": "Mozilla/5.0 (compatible; Barracuda Sentinel link scanner)"}
    assert (await env.http.get(click, headers=scanner)).status_code == 302
    assert [(r["kind"], r["hits"], bool(r["machine"])) for r in await env.rows()] == [
        ("open", 2, True), ("click", 1, True)]
    assert not await engaged(env.store, "u1", "tracked", "open")
    assert not await engaged(env.store, "u1", "tracked", "click")
    events, _ = sub.drain()
    assert [(e.kind, e.data["message"], e.data.get("machine")) for e in events] == [
        ("message.opened", mid, True), ("message.opened", mid, True),
        ("message.clicked", mid, True)]
    # the reader opens it (through Gmail's image proxy) and clicks
    assert (await env.http.get(pixel, headers={"user-agent": GMAIL_PROXY})).status_code == 200
    assert (await env.http.get(click, headers={"user-agent": APPLE_MAIL})).status_code == 302
    assert [(r["kind"], r["hits"], bool(r["machine"])) for r in await env.rows()] == [
        ("open", 2, True), ("click", 1, True), ("open", 1, False), ("click", 1, False)]
    assert await engaged(env.store, "u1", "tracked", "open")
    assert await engaged(env.store, "u1", "tracked", "click")


def test_machine_agents_are_told_from_readers() -> None:
    for agent in (APPLE_PREFETCH, " mozilla/5.0 ", "Googlebot/2.1 (+http://www.google.com/bot)",
                  "Slackbot-LinkExpanding 1.0", "python-requests/2.31", "curl/8.0",
                  "Mimecast Link Scanner", "Proofpoint URL Defense"):
        assert is_machine(agent), agent
    for agent in ("", APPLE_MAIL, GMAIL_PROXY, "YahooMailProxy; https://help.yahoo.com",
                  "Mozilla/5.0 (Linux; Android 9; CUBOT_X19) Mobile Safari/537.36",
                  "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0)"):
        assert not is_machine(agent), agent


async def test_hits_wait_in_the_buffer_and_are_written_on_a_clean_stop(env: Env) -> None:
    await env.send()
    pixel, click = env.links()
    recorder = env.svc.engagement
    async with anyio.create_task_group() as tg:
        await tg.start(recorder.run)
        assert (await env.http.get(click)).status_code == 302
        assert (await env.http.get(pixel)).status_code == 200
        assert (await env.http.get(click)).status_code == 302
        assert recorder.statistics().buffered == 3
        assert await env.rows() == []  # nothing waited for the store
        recorder.stop()
    assert [(r["kind"], r["hits"]) for r in await env.rows()] == [("click", 2), ("open", 1)]
    stats = recorder.statistics()
    assert (stats.buffered, stats.recorded, stats.dropped) == (0, 3, 0)


async def test_the_recorder_writes_every_interval_while_it_runs(env: Env) -> None:
    await env.send()
    _pixel, click = env.links()
    recorder = env.svc.engagement
    async with anyio.create_task_group() as tg:
        await tg.start(recorder.run)
        assert (await env.http.get(click)).status_code == 302
        assert recorder.statistics().buffered == 1
        with anyio.fail_after(10):  # a write is store I/O: wait for it, not for time
            while recorder.statistics().recorded < 1:
                await env.setup.clock.advance(recorder.interval)
                await anyio.sleep(0.01)
        assert [(r["kind"], r["hits"]) for r in await env.rows()] == [("click", 1)]
        assert recorder.statistics().buffered == 0
        recorder.stop()


async def test_a_full_buffer_drops_and_counts_hits_and_every_link_still_redirects(
        env: Env) -> None:
    await env.send()
    _pixel, click = env.links()
    recorder = env.svc.engagement
    recorder.capacity = 2
    async with anyio.create_task_group() as tg:
        await tg.start(recorder.run)
        for _ in range(5):
            r = await env.http.get(click)
            assert r.status_code == 302
            assert r.headers["location"] == TARGET
        assert recorder.statistics().dropped == 3
        recorder.stop()
    assert [(r["kind"], r["hits"]) for r in await env.rows()] == [("click", 2)]
    assert env.setup.kernel.metrics.value("segflow_engagement_dropped_total") == 3


async def test_html_pages_carry_the_security_headers_and_every_response_nosniff(
        env: Env) -> None:
    await env.send("welcome")
    link = parse(env.provider.sent[-1].mime)["List-Unsubscribe"].split(">")[0].lstrip("<")
    path = link.removeprefix("https://mail.example.com")
    for page in (await env.http.get(path), await env.http.post(path)):
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        csp = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp
        assert "default-src 'none'" in csp
        assert "script-src" not in csp  # no script may run
    missing = await env.http.get("/t/c/not-a-token")
    assert missing.status_code == 404
    assert missing.headers["x-content-type-options"] == "nosniff"
    assert "x-frame-options" not in missing.headers  # JSON: nosniff only


async def test_a_version_5_store_counts_its_old_rows_as_one_reader_hit_each(
        store: Store, tmp_path: Path) -> None:
    """m0006: old rows are one hit by a person; a new hit on the same link adds to one."""
    async with environment(store, tmp_path) as env:
        mid = await env.send()
        _pixel, click = env.links()
        async with store.begin() as conn:
            for drop in ("ALTER TABLE engagement DROP COLUMN hits",
                         "ALTER TABLE engagement DROP COLUMN machine",
                         "ALTER TABLE engagement DROP COLUMN last_at"):
                await conn.execute(sa.text(drop))
            old = sa.table("engagement", *(sa.column(c) for c in (
                "message_id", "user_id", "kind", "url", "created_at")))
            for _ in range(2):
                await conn.execute(sa.insert(old).values(
                    message_id=mid, user_id="u1", kind="click", url=TARGET,
                    created_at=env.setup.clock.now()))
            await conn.execute(sa.update(schema.schema_version).values(version=5))
        assert await store.migrate() == 5
        assert await engaged(store, "u1", "tracked", "click")
        assert (await env.http.get(click)).status_code == 302
        assert [(r["hits"], bool(r["machine"])) for r in await env.rows()] == [
            (2, False), (1, False)]


@pytest.mark.mariadb
async def test_every_link_redirects_during_a_store_outage_and_counts_after_it(
        mariadb_url: str, tmp_path: Path) -> None:
    real = sa.engine.make_url(mariadb_url)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 3306)
    async with anyio.create_task_group() as outer:
        await outer.start(proxy.serve)
        store = Store.open(real.set(port=proxy.port).render_as_string(hide_password=False),
                           connect_timeout=2)
        await store.migrate()
        try:
            async with environment(store, tmp_path) as env:
                await env.send()
                pixel, click = env.links()
                recorder = env.svc.engagement
                async with anyio.create_task_group() as tg:
                    await tg.start(recorder.run)
                    proxy.cut()
                    followed = await env.http.get(click)
                    assert followed.status_code == 302
                    assert followed.headers["location"] == TARGET
                    assert (await env.http.get(pixel)).status_code == 200
                    with pytest.raises(StoreUnavailable):
                        await recorder.flush()
                    assert recorder.statistics().buffered == 2  # kept for the next write
                    await outer.start(proxy.serve)  # the store comes back on the same port
                    recorder.stop()
                assert [(r["kind"], r["hits"]) for r in await env.rows()] == [
                    ("click", 1), ("open", 1)]
                assert recorder.statistics().write_errors >= 1
        finally:
            await store.close()
            proxy.cut()
