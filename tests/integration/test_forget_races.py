"""A forget racing the paths that start flows: a broadcast's batch, a segment entry, and an
operator's restart. Each used to bring the forgotten id back (found by an adversarial
review of the forget)."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

from segflowd import schema
from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.delivery.tokens import Signer
from segflowd.delivery.tracking import Tracking
from segflowd.errors import FlowError
from segflowd.flows.service import FlowService
from segflowd.hooks import MembershipChange
from segflowd.ingest.users import forget_user
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.sources.broadcasts import BroadcastService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio
NOW = dt.datetime(2026, 3, 1, 12, 0)


def announce(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("news")
    yield rt.wait(days=1)


def crashes(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("news")
    raise RuntimeError(f"boom for {ctx.user.get('email')}")


def app_() -> Segflow:
    app = Segflow(templates="templates")
    app.segment("everyone", sql="SELECT id FROM users")
    app.template("news", subject="News", html="news.html")
    app.template("receipt", subject="Receipt", html="news.html")
    app.transaction("receipt", event="purchase", template="receipt")
    app.campaign("launch", segments=["everyone"])(announce)  # type: ignore[arg-type]
    app.campaign("crashy", segments=["crashseg"])(crashes)  # type: ignore[arg-type]
    app.segment("crashseg", sql="SELECT id FROM users")
    return app


def kernel(store: Store, tmp_path: Path) -> Kernel:
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                    '[providers.outbox]\nplugin = "outbox"\n')
    return Kernel(config=load_config(path, environ={}), app=app_(), store=store,
                  clock=FakeClock(NOW), bus=Bus(), metrics=Metrics())


async def seed(store: Store, uids: list[str], segment: str = "everyone") -> None:
    async with store.begin() as conn:
        await conn.execute(sa.insert(schema.users), [
            {"id": u, "email": f"{u}@example.com", "attributes": {}, "created_at": NOW,
             "updated_at": NOW} for u in uids])
        await conn.execute(sa.insert(schema.segment_members), [
            {"segment": segment, "user_id": u, "entered_at": NOW, "evaluated_at": NOW}
            for u in uids])


async def forget(store: Store, uid: str) -> None:
    async with store.begin() as conn:
        assert await forget_user(conn, uid, NOW)


def forget_before_next_begin(store: Store, uid: str) -> None:
    """The next store.begin() first commits a forget of uid (a forget racing the caller)."""
    orig = store.begin
    fired = False

    @contextlib.asynccontextmanager
    async def begin() -> AsyncIterator[Any]:
        nonlocal fired
        if not fired:
            fired = True
            await forget(store, uid)
        async with orig() as conn:
            yield conn

    store.begin = begin  # type: ignore[method-assign]


async def mentions(store: Store, needle: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    async with store.connect() as conn:
        for table in schema.metadata.sorted_tables:
            cols = [c for c in table.columns if isinstance(c.type, sa.String | sa.Text | sa.JSON)
                    or "JSON" in type(c.type).__name__]
            if not cols:
                continue
            for row in await conn.execute(sa.select(*cols)):
                for col, v in zip(cols, row, strict=True):
                    if v is not None and needle in str(v):
                        found.setdefault(f"{table.name}.{col.name}", []).append(str(v))
    return found


async def test_a_broadcast_racing_a_forget_starts_no_flow_for_the_id(
        store: Store, tmp_path: Path) -> None:
    k = kernel(store, tmp_path)
    await seed(store, ["a1", "zed"])
    flows = FlowService(k)

    @dataclasses.dataclass
    class Racing:
        inner: FlowService
        @property
        def paused(self) -> Any:
            return self.inner.paused
        async def start_flow(self, campaign: str, user_id: str, *, key: str, data: Any) -> Any:
            if user_id == "zed":
                await forget(store, "zed")
            return await self.inner.start_flow(campaign, user_id, key=key, data=data)

    svc = BroadcastService(k, flows=Racing(flows))
    async with anyio.create_task_group() as tg:
        await tg.start(flows.run)
        bid = await svc.launch(segment="everyone", campaign="launch", rate=10, data={"c": "x"})
        await svc.step(bid)
        await flows.settle()
        tg.cancel_scope.cancel()
    found = await mentions(store, "zed")
    assert found == {}, found


async def test_an_entry_applied_after_a_forget_starts_no_instance(
        store: Store, tmp_path: Path) -> None:
    k = kernel(store, tmp_path)
    await seed(store, ["a1", "zed"])
    flows = FlowService(k)
    orig = flows.enter

    async def enter(c: Any, uid: str, event_id: Any = None, **kw: Any) -> Any:
        if uid == "zed":
            await forget(store, "zed")  # committed between the membership read and enter()
        return await orig(c, uid, event_id, **kw)
    flows.enter = enter  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        await tg.start(flows.run)
        await flows.membership_changed([MembershipChange("everyone", u, True, NOW)
                                        for u in ("a1", "zed")])
        await flows.settle()
        tg.cancel_scope.cancel()
    found = await mentions(store, "zed")
    assert found == {}, found


async def test_a_forgotten_users_failed_instance_cannot_be_restarted(
        store: Store, tmp_path: Path) -> None:
    k = kernel(store, tmp_path)
    async with store.begin() as conn:
        await conn.execute(sa.insert(schema.users).values(id="zed", email="z@example.com",
                           attributes={}, created_at=NOW, updated_at=NOW))
        iid = int((await conn.execute(sa.insert(schema.flow_instances).values(
            campaign="launch", user_id="zed", version="v", status="failed", live=None, seq=0,
            created_at=NOW, updated_at=NOW, ended_at=NOW))).inserted_primary_key[0])
    await forget(store, "zed")
    flows = FlowService(k)
    async with anyio.create_task_group() as tg:
        await tg.start(flows.run)
        with pytest.raises(FlowError, match="forgotten"):
            await k.actions["instance.restart"]({"instance": iid})
        await flows.settle()
        tg.cancel_scope.cancel()
    async with store.connect() as conn:
        fi = (await conn.execute(sa.select(schema.flow_instances.c.id))).all()
        m = (await conn.execute(sa.select(schema.messages.c.id))).all()
    assert len(fi) == 1, fi
    assert m == []


async def test_an_old_unsubscribe_link_of_a_forgotten_user_names_nobody(
        store: Store, tmp_path: Path) -> None:
    """The link still works (the page shows), but no subscription row brings the id back
    or unsubscribes whoever signs up under it next."""
    k = kernel(store, tmp_path)
    await seed(store, ["zed"])
    await forget(store, "zed")
    await Tracking(k, Signer("k")).apply_unsubscribe({"u": "zed", "m": 1})
    assert await mentions(store, "zed") == {}
