"""Broadcasts on real stores (SQLite and MariaDB): once per user across a restart, even
when the cursor was lost; rate-limited on the injected clock; progress on the bus."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import broadcasts, messages, segment_members, users
from segflowd.sources.broadcasts import BroadcastError, BroadcastService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

USERS = [f"u{i:03d}" for i in range(25)] + ["x' OR '1'='1"]  # an injection id is plain data


def make_app() -> Segflow:
    app = Segflow(templates="templates")
    app.segment("everyone", sql="SELECT id FROM users")
    app.template("news", subject="News for {{ user.id }}", html="news.html")
    return app


class Waker:
    def __init__(self) -> None:
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


async def make_kernel(store: Store, tmp_path: Path) -> Kernel:
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                    '[providers.outbox]\nplugin = "outbox"\n')
    k = Kernel(config=load_config(path, environ={}), app=make_app(), store=store,
               clock=FakeClock(), bus=Bus(), metrics=Metrics())
    now = k.clock.now()
    async with store.begin() as conn:
        await conn.execute(sa.insert(users), [
            {"id": u, "email": f"{i}@example.com", "attributes": {}, "created_at": now,
             "updated_at": now} for i, u in enumerate(USERS)])
        await conn.execute(sa.insert(segment_members), [
            {"segment": "everyone", "user_id": u, "entered_at": now, "evaluated_at": now}
            for u in USERS])
    return k


async def queued(store: Store) -> list[tuple[str, str]]:
    async with store.connect() as conn:
        return [(r.user_id, r.dedupe_key) for r in await conn.execute(
            sa.select(messages.c.user_id, messages.c.dedupe_key)
            .where(messages.c.kind == "broadcast"))]


async def row(store: Store, bid: int) -> sa.Row[tuple[object, ...]]:
    async with store.connect() as conn:
        r = (await conn.execute(sa.select(broadcasts).where(broadcasts.c.id == bid))).first()
    assert r is not None
    return r


async def until(cond: Callable[[], object], clock: FakeClock, *, step: float = 1.0) -> None:
    """Advance the fake clock until ``cond`` holds (bounded)."""
    for _ in range(400):
        if await cond():  # type: ignore[misc]  # an async predicate
            return
        await clock.advance(step)
        await anyio.sleep(0.01)  # let store I/O threads finish
    raise AssertionError("condition never held")


async def test_broadcast_interrupted_by_a_restart_finishes_once_per_user(
        store: Store, tmp_path: Path) -> None:
    k = await make_kernel(store, tmp_path)
    first = BroadcastService(k)
    bid = await first.launch(segment="everyone", template="news", rate=10)  # not running:
    assert await first.step(bid) == 1.0  # one batch of 10 is handled, then the process "dies"
    assert len(await queued(store)) == 10
    # The worst case: the crash also lost the cursor (as if the batch's commit of the
    # cursor had not happened): the resumed broadcast walks those users again.
    async with store.begin() as conn:
        await conn.execute(sa.update(broadcasts).where(broadcasts.c.id == bid).values(
            after=None, done=0))
    clock = k.clock
    assert isinstance(clock, FakeClock)
    second = BroadcastService(k)  # the restarted daemon's service resumes it at start
    async with anyio.create_task_group() as tg:
        await tg.start(second.run)

        async def completed() -> bool:
            return (await row(store, bid)).status == "completed"

        await until(completed, clock)
        tg.cancel_scope.cancel()
    sent = await queued(store)
    assert sorted(u for u, _ in sent) == sorted(USERS)  # everyone, once
    assert {key for _, key in sent} == {f"bc:{bid}:{u}" for u in USERS}


async def test_broadcast_is_rate_limited_and_reports_progress_on_the_bus(
        store: Store, tmp_path: Path) -> None:
    k = await make_kernel(store, tmp_path)
    clock = k.clock
    assert isinstance(clock, FakeClock)
    waker = Waker()
    service = BroadcastService(k, wakers=[waker])
    sub = k.bus.subscribe(kinds=frozenset({"broadcast"}))
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        reply = await k.actions["broadcast.launch"](
            {"segment": "everyone", "template": "news", "rate": "10", "broadcast": "weekly"})
        assert isinstance(reply, dict)
        bid = int(reply["id"])  # type: ignore[call-overload]  # JSON value
        assert reply["total"] == len(USERS)

        async def first_batch() -> bool:
            return len(await queued(store)) == 10

        await until(first_batch, clock, step=0.0)
        await anyio.sleep(0.2)  # real time passes; fake time does not: no second batch
        assert len(await queued(store)) == 10

        async def completed() -> bool:
            return (await row(store, bid)).status == "completed"

        await until(completed, clock)
        tg.cancel_scope.cancel()
    events, _missed = sub.drain()
    kinds = [(e.kind, e.data.get("done")) for e in events]
    assert kinds == [("broadcast.launched", None), ("broadcast.progress", 10),
                     ("broadcast.progress", 20), ("broadcast.progress", 26),
                     ("broadcast.completed", None)]
    assert waker.woken == 3
    r = await row(store, bid)
    assert (r.done, r.name) == (len(USERS), "weekly")


async def test_broadcast_launch_refuses_unknown_template_segment_and_flowless_campaign(
        store: Store, tmp_path: Path) -> None:
    k = await make_kernel(store, tmp_path)
    service = BroadcastService(k)
    with pytest.raises(BroadcastError, match="unknown template 'nope'"):
        await service.launch(segment="everyone", template="nope")
    with pytest.raises(BroadcastError, match="unknown segment 'nope'"):
        await service.launch(segment="nope", template="news")
    with pytest.raises(BroadcastError, match="exactly one of template and campaign"):
        await service.launch(segment="everyone")
    with pytest.raises(BroadcastError, match="rate must be"):
        await k.actions["broadcast.launch"]({"segment": "everyone", "template": "news",
                                             "rate": "fast"})
    assert await queued(store) == []
