"""Topics on the messages that campaigns and broadcasts queue, on both stores: a campaign's
flow sends carry its topic, a broadcast's ``topic`` (an app topic, else a clear error) is
stored and carried by its messages, and ``segflowd broadcast --topic`` passes it on."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from control_harness import make_config, running_daemon, short_tmp

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.cli.commands import main
from segflowd.config import load_config
from segflowd.flows.service import FlowService
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import broadcasts, messages, segment_members, users
from segflowd.sources.broadcasts import BroadcastError, BroadcastService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

USERS = ["u1", "u2", "u3"]


def letter(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("news")


def make_app() -> Segflow:
    app = Segflow(templates="templates")
    app.topic("newsletter", title="Newsletter")
    app.topic("offers", title="Offers")
    app.segment("everyone", sql="SELECT id FROM users")
    app.template("news", subject="News", html="news.html")
    app.campaign("letter", segments=["everyone"], topic="newsletter")(letter)  # type: ignore[arg-type]
    app.campaign("plain", segments=["everyone"])(letter)  # type: ignore[arg-type]
    return app


async def make_kernel(store: Store, tmp_path: Path) -> Kernel:
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                    '[providers.outbox]\nplugin = "outbox"\n')
    k = Kernel(config=load_config(path, environ={}), app=make_app(), store=store,
               clock=FakeClock(), bus=Bus(), metrics=Metrics())
    now = k.clock.now()
    async with store.begin() as conn:
        await conn.execute(sa.insert(users), [
            {"id": u, "email": f"{u}@example.com", "attributes": {}, "created_at": now,
             "updated_at": now} for u in USERS])
        await conn.execute(sa.insert(segment_members), [
            {"segment": "everyone", "user_id": u, "entered_at": now, "evaluated_at": now}
            for u in USERS])
    return k


async def queued(store: Store) -> list[tuple[str, str | None, str | None]]:
    """(user, campaign, topic) of every queued message."""
    m = messages.c
    async with store.connect() as conn:
        return [(r.user_id, r.campaign, r.topic) for r in await conn.execute(
            sa.select(m.user_id, m.campaign, m.topic).order_by(m.id))]


async def broadcast_topics(store: Store) -> list[str | None]:
    async with store.connect() as conn:
        return [r[0] for r in await conn.execute(
            sa.select(broadcasts.c.topic).order_by(broadcasts.c.id))]


async def finish(service: BroadcastService, bid: int) -> None:
    while await service.step(bid) is not None:
        pass


async def test_a_broadcast_with_a_topic_stores_it_and_its_messages_carry_it(
        store: Store, tmp_path: Path) -> None:
    k = await make_kernel(store, tmp_path)
    service = BroadcastService(k)
    reply = await k.actions["broadcast.launch"](
        {"segment": "everyone", "template": "news", "topic": "offers"})
    assert isinstance(reply, dict)
    assert reply["topic"] == "offers"
    await finish(service, int(reply["id"]))
    plain = await service.launch(segment="everyone", template="news")
    await finish(service, plain)
    assert await broadcast_topics(store) == ["offers", None]
    assert await queued(store) == [(u, None, "offers") for u in USERS] + [
        (u, None, None) for u in USERS]


async def test_a_broadcast_refuses_a_topic_the_app_does_not_define(
        store: Store, tmp_path: Path) -> None:
    k = await make_kernel(store, tmp_path)
    BroadcastService(k)
    with pytest.raises(BroadcastError, match=r"unknown topic 'nope' \(topics: newsletter, "
                                             r"offers"):
        await k.actions["broadcast.launch"](
            {"segment": "everyone", "template": "news", "topic": "nope"})
    with pytest.raises(BroadcastError, match="unknown topic 'marketing'"):
        await k.actions["broadcast.launch"](
            {"segment": "everyone", "template": "news", "topic": "marketing"})
    assert await broadcast_topics(store) == []
    assert await queued(store) == []


async def test_campaign_sends_carry_the_campaign_topic(store: Store, tmp_path: Path) -> None:
    """Started by a broadcast: the flow's send has its campaign's topic (none for a
    campaign without one); a broadcast of it cannot name another topic."""
    k = await make_kernel(store, tmp_path)
    flows = FlowService(k)
    service = BroadcastService(k, flows=flows)
    async with anyio.create_task_group() as tg:
        await tg.start(flows.run)
        with pytest.raises(BroadcastError, match="has its campaign's topic \\(newsletter\\)"):
            await service.launch(segment="everyone", campaign="letter", topic="offers")
        await finish(service, await service.launch(segment="everyone", campaign="letter"))
        await flows.settle()
        await finish(service, await service.launch(segment="everyone", campaign="plain"))
        await flows.settle()
        tg.cancel_scope.cancel()
    assert await broadcast_topics(store) == ["newsletter", None]
    rows = await queued(store)
    assert sorted(r for r in rows if r[1] == "letter") == [
        (u, "letter", "newsletter") for u in USERS]
    assert sorted(r for r in rows if r[1] == "plain") == [(u, "plain", None) for u in USERS]


async def test_the_broadcast_command_passes_its_topic(
        store: Store, tmp_path: Path, sqlite_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    k = await make_kernel(store, tmp_path)
    BroadcastService(k)
    with short_tmp() as folder:
        config = make_config(folder, sqlite_url)
        sock = ("--socket", str(config.daemon.control_socket))
        async with running_daemon(config, actions={
                "broadcast.launch": k.actions["broadcast.launch"]}):
            ok = await anyio.to_thread.run_sync(main, [
                "broadcast", "everyone", "--template", "news", "--topic", "offers", *sock])
            capsys.readouterr()
            bad = await anyio.to_thread.run_sync(main, [
                "broadcast", "everyone", "--template", "news", "--topic", "nope", *sock])
            err = capsys.readouterr().err
    assert ok == 0
    assert bad == 1
    assert "unknown topic 'nope'" in err
    assert "Traceback" not in err
    assert await broadcast_topics(store) == ["offers"]
