"""Broadcasts on real stores (SQLite and MariaDB): once per user across a restart, even
when the cursor was lost, or after a transient store error; rate-limited on the injected
clock; progress on the bus; held while their campaign is paused."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import pymysql
import pytest
import sqlalchemy as sa

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.flows.service import FlowService
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import broadcasts, flow_instances, messages, segment_members, users
from segflowd.sources.broadcasts import BroadcastError, BroadcastService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

USERS = [f"u{i:03d}" for i in range(25)] + ["x' OR '1'='1"]  # an injection id is plain data


def announce(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.wait(days=1)


def make_app() -> Segflow:
    app = Segflow(templates="templates")
    app.segment("everyone", sql="SELECT id FROM users")
    app.template("news", subject="News for {{ user.id }}", html="news.html")
    app.campaign("launch", segments=["everyone"])(announce)  # type: ignore[arg-type]
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


async def started(store: Store) -> list[tuple[str, str]]:
    """(user, start key) of every flow instance a broadcast started."""
    fi = flow_instances.c
    async with store.connect() as conn:
        return [(r.user_id, r.start_key) for r in await conn.execute(
            sa.select(fi.user_id, fi.start_key).where(fi.start_key.is_not(None)))]


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


# -- campaigns: paused is not "already running" ------------------------------------------

class PausingStarter:
    """The flow engine, with the campaign paused by an operator right after the
    ``pause_after``-th start (as if ``segflowd pause`` landed in the middle of a batch)."""

    def __init__(self, flows: FlowService, k: Kernel, pause_after: int) -> None:
        self.flows, self.k, self.pause_after = flows, k, pause_after
        self.calls = 0

    @property
    def paused(self) -> set[str]:
        return self.flows.paused

    async def start_flow(self, campaign: str, user_id: str, *, key: str,
                         data: Mapping[str, object]) -> Literal["started", "exists", "paused"]:
        result = await self.flows.start_flow(campaign, user_id, key=key, data=data)
        self.calls += 1
        if self.calls == self.pause_after:
            await self.k.actions["campaign.pause"]({"campaign": campaign})
        return result


async def test_a_broadcast_to_a_paused_campaign_is_refused_at_launch(
        store: Store, tmp_path: Path) -> None:
    k = await make_kernel(store, tmp_path)
    flows = FlowService(k)
    BroadcastService(k, flows=flows)  # it answers the broadcast.launch action
    async with anyio.create_task_group() as tg:
        await tg.start(flows.run)
        await k.actions["campaign.pause"]({"campaign": "launch"})
        with pytest.raises(BroadcastError, match="campaign 'launch' is paused"):
            await k.actions["broadcast.launch"]({"segment": "everyone", "campaign": "launch"})
        tg.cancel_scope.cancel()
    async with store.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(broadcasts))
                ).scalar_one() == 0
    assert await started(store) == []


async def test_a_campaign_paused_mid_broadcast_holds_it_until_resumed(
        store: Store, tmp_path: Path) -> None:
    """Paused in the middle of its second batch: the users not started are not counted
    done; the broadcast waits (still running) and, once resumed, starts each user once."""
    k = await make_kernel(store, tmp_path)
    clock = k.clock
    assert isinstance(clock, FakeClock)
    flows = FlowService(k)
    starter = PausingStarter(flows, k, pause_after=13)
    service = BroadcastService(k, flows=starter)
    async with anyio.create_task_group() as tg:
        await tg.start(flows.run)
        bid = await service.launch(segment="everyone", campaign="launch", rate=10)
        assert await service.step(bid) == 1.0  # users 1-10
        await service.step(bid)  # 11-13 start, then the campaign is paused
        assert len(await started(store)) == 13
        assert (await row(store, bid)).done == 13
        # "paused" is told apart from "already running" (which counts as done):
        assert await flows.start_flow("launch", USERS[20], key="probe", data={}) == "paused"
        for _ in range(3):  # held: nobody is started or skipped while paused
            pause = await service.step(bid)
            assert pause is not None
            assert pause > 0
        r = await row(store, bid)
        assert (r.status, r.done, r.after) == ("running", 13, USERS[12])
        assert len(await started(store)) == 13
        await k.actions["campaign.resume"]({"campaign": "launch"})
        while await service.step(bid) is not None:
            pass
        await flows.settle()
        tg.cancel_scope.cancel()
    r = await row(store, bid)
    assert (r.status, r.done) == ("completed", len(USERS))
    instances = await started(store)
    assert sorted(u for u, _ in instances) == sorted(USERS)  # everyone, once
    assert {key for _, key in instances} == {f"bc:{bid}:{u}" for u in USERS}
    assert await flows.start_flow("launch", USERS[0], key=f"bc:{bid}:{USERS[0]}",
                                  data={}) == "exists"


# -- transient store errors are retried ----------------------------------------------------

def transient_error(store: Store) -> Exception:
    """The driver's own error for a transient failure: what a real one raises."""
    if store.dialect == "sqlite":
        return sqlite3.OperationalError("database is locked")
    return pymysql.err.OperationalError(
        1213, "Deadlock found when trying to get lock; try restarting transaction")


@contextmanager
def failing(store: Store, prefix: str, *, nth: int,
            error: Exception | None = None) -> Iterator[list[str]]:
    """The ``nth`` statement starting with ``prefix`` fails in the driver with ``error``
    (a transient one by default), passing through SQLAlchemy and the store as a real
    failure does. Yields the statements that matched."""
    matched: list[str] = []

    def before(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith(prefix):
            matched.append(statement)
            if len(matched) == nth:
                raise error or transient_error(store)

    sa.event.listen(store.engine.sync_engine, "before_cursor_execute", before)
    try:
        yield matched
    finally:
        sa.event.remove(store.engine.sync_engine, "before_cursor_execute", before)


async def finished(store: Store, bid: int, clock: FakeClock) -> sa.Row[tuple[object, ...]]:
    async def done() -> bool:
        return (await row(store, bid)).status != "running"

    await until(done, clock)
    return await row(store, bid)


async def test_a_transient_store_error_is_retried_and_reaches_everyone_once(
        store: Store, tmp_path: Path) -> None:
    """A deadlock (MariaDB) or a locked database (SQLite) on a batch's commit rolls the
    batch back; the broadcast retries it after a backoff instead of failing."""
    k = await make_kernel(store, tmp_path)
    clock = k.clock
    assert isinstance(clock, FakeClock)
    service = BroadcastService(k)
    sub = k.bus.subscribe(kinds=frozenset({"broadcast"}))
    with failing(store, "UPDATE BROADCASTS", nth=2) as matched:
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            bid = await service.launch(segment="everyone", template="news", rate=10)
            r = await finished(store, bid, clock)
            tg.cancel_scope.cancel()
    assert len(matched) > 2  # the fault was hit, and the broadcast went on
    assert (r.status, r.error, r.done) == ("completed", None, len(USERS))
    sent = await queued(store)
    assert sorted(u for u, _ in sent) == sorted(USERS)  # everyone, once
    events, _missed = sub.drain()
    assert "broadcast.failed" not in [e.kind for e in events]


async def test_a_transient_error_while_starting_flows_starts_each_user_once(
        store: Store, tmp_path: Path) -> None:
    k = await make_kernel(store, tmp_path)
    clock = k.clock
    assert isinstance(clock, FakeClock)
    flows = FlowService(k)
    service = BroadcastService(k, flows=flows)
    with failing(store, "INSERT INTO FLOW_INSTANCES", nth=15) as matched:
        async with anyio.create_task_group() as tg:
            await tg.start(flows.run)
            await tg.start(service.run)
            bid = await service.launch(segment="everyone", campaign="launch", rate=10)
            r = await finished(store, bid, clock)
            await flows.settle()
            tg.cancel_scope.cancel()
    assert len(matched) >= 15
    assert (r.status, r.error, r.done) == ("completed", None, len(USERS))
    instances = await started(store)
    assert sorted(u for u, _ in instances) == sorted(USERS)


async def test_a_real_store_error_fails_the_broadcast_with_its_message(
        store: Store, tmp_path: Path) -> None:
    """Failed is for errors a retry would not cure (here: a table the server says is
    missing); the daemon goes on."""
    k = await make_kernel(store, tmp_path)
    clock = k.clock
    assert isinstance(clock, FakeClock)
    service = BroadcastService(k)
    real = (sqlite3.OperationalError("no such table: broadcasts") if store.dialect == "sqlite"
            else pymysql.err.ProgrammingError(1146, "Table 'broadcasts' doesn't exist"))
    with failing(store, "UPDATE BROADCASTS", nth=1, error=real):
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            bid = await service.launch(segment="everyone", template="news", rate=10)
            r = await finished(store, bid, clock)
            tg.cancel_scope.cancel()
    assert r.status == "failed"
    assert "broadcasts" in str(r.error)
    assert service.statistics().running == 0
