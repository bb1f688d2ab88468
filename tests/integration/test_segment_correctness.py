"""The segment engine around forgets, restarts, audience syncs and the refresh limit (issue
#24, items 13 to 18), on SQLite and MariaDB: each test failed before its fix."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import select
from test_segment_engine import NOW, H, RecordingSink, harness, kernel_for, make_app

from segflowd.app import Segflow
from segflowd.hooks import IngestBatch
from segflowd.ingest.committer import GroupCommitter
from segflowd.ingest.users import forget_user
from segflowd.ingest.writes import ForgetWrite, UserWrite
from segflowd.schema import audience_members, segment_changes, segment_members, users
from segflowd.segments import refresh as refresh_module
from segflowd.segments.engine import SegmentService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> H:
    return await harness(store, tmp_path)


@pytest.fixture
async def committer(h: H) -> AsyncIterator[GroupCommitter]:
    """The ingest committer, telling the engine of each commit as the daemon wires it."""
    c = GroupCommitter(h.store, h.clock, [h.engine])
    async with anyio.create_task_group() as tg:
        await tg.start(c.run)
        yield c
        tg.cancel_scope.cancel()


async def size_of(h: H, segment: str) -> int:
    return next(s.size for s in h.engine.statistics().segments if s.name == segment)


# -- 13: a forget reports the exits it caused -------------------------------------------


async def test_a_forget_reports_each_exit_to_sinks_and_the_bus_and_recounts(
        h: H, committer: GroupCommitter) -> None:
    await h.tell(await h.user("bo", plan="pro"), await h.user("cy", plan="pro"))
    assert await h.members("pro") == {"bo", "cy"}
    assert await size_of(h, "pro") == 2
    sub = h.kernel.bus.subscribe(kinds=frozenset({"segment"}))
    await committer.submit([ForgetWrite("bo")])
    changes = await h.engine.drain_once()
    exits = sorted((c.segment, c.user_id, c.entered, c.forgotten) for c in changes)
    assert exits == [("new-users", "bo", False, True), ("pro", "bo", False, True)]
    assert h.sink.seen("pro") == [("bo", True), ("cy", True), ("bo", False)]
    assert await size_of(h, "pro") == 1
    published, _ = sub.drain()
    assert sorted((e.kind, e.data["segment"], e.data["user_id"]) for e in published) == [
        ("segment.exited", "new-users", "bo"), ("segment.exited", "pro", "bo")]


async def test_a_forget_while_the_segment_refreshes_is_reported_after_the_refresh(
        h: H, committer: GroupCommitter) -> None:
    await h.tell(await h.user("bo", plan="pro"))
    h.engine._state["pro"].refreshing = True  # as between a refresh's start and end
    await committer.submit([ForgetWrite("bo")])
    assert [c.segment for c in await h.engine.drain_once()] == ["new-users"]
    h.engine._state["pro"].refreshing = False
    changes = await h.engine.drain_once()
    assert [(c.user_id, c.entered, c.forgotten) for c in changes] == [("bo", False, True)]
    assert await size_of(h, "pro") == 0


# -- 14: forgotten and created again in one flush ---------------------------------------


async def test_a_user_forgotten_and_created_again_in_one_flush_is_evaluated(h: H) -> None:
    await h.tell(await h.user("bo", plan="pro"))
    assert await h.members("pro") == {"bo"}
    async with h.store.begin() as conn:
        assert await forget_user(conn, "bo", h.clock.now())
        await conn.execute(sa.insert(users).values(
            id="bo", email="bo@example.com", attributes={"plan": "pro"},
            created_at=h.clock.now(), updated_at=h.clock.now()))
    # What the committer hands on for that flush: forgotten, and a user again.
    await h.tell(IngestBatch(users=frozenset({"bo"}), events=(), deleted=frozenset({"bo"}),
                             left={"bo": ("pro",)}))
    await h.engine.drain_once()
    assert await h.members("pro") == {"bo"}


# -- 15: users deferred behind a refresh survive a restart -------------------------------


async def test_users_deferred_behind_a_refresh_are_caught_up_after_a_restart(
        h: H, tmp_path: Path) -> None:
    await h.tell(await h.user("bo", plan="free"))
    h.engine._state["pro"].refreshing = True
    h.clock._now += dt.timedelta(minutes=5)
    async with h.store.begin() as conn:
        await conn.execute(sa.update(users).where(users.c.id == "bo").values(
            attributes={"plan": "pro"}, updated_at=h.clock.now()))
    h.engine.ingested(IngestBatch(users=frozenset({"bo"}), events=()))
    await h.engine.drain_once()  # "pro" is refreshing: bo waits for it
    h.clock._now += dt.timedelta(minutes=5)
    h.engine.ingested(IngestBatch(users=frozenset({"zed"}), events=()))
    await h.engine.drain_once()
    await h.engine.drain()  # a stop saves the cursor; the deferred user is not done
    assert await h.members("pro") == set()
    # A restart (the refresh never ended) catches up with bo.
    again = SegmentService(kernel_for(h.store, make_app(), h.clock, tmp_path))
    await again.start()
    assert "bo" in again._dirty
    await again.drain_once()
    assert await h.members("pro") == {"bo"}


# -- 16: Core segments over the tables an audience sync writes ---------------------------


def audience_app() -> Segflow:
    app = make_app()

    @app.segment("vip-audience")
    def vip():  # type: ignore[no-untyped-def]
        am = audience_members
        return select(am.c.user_id).where(am.c.audience == "vip")

    return app


async def test_a_core_segment_over_audience_members_follows_an_audience_sync(
        store: Store, tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    engine = SegmentService(kernel_for(store, audience_app(), clock, tmp_path))
    await engine.start()
    async with store.begin() as conn:
        await conn.execute(sa.insert(users).values(
            id="ann", email=None, attributes={}, created_at=NOW, updated_at=NOW))
        await conn.execute(sa.insert(audience_members).values(
            audience="vip", user_id="ann", joined_at=NOW))
    engine.ingested(IngestBatch(users=frozenset({"ann"}), events=(),
                                tables=frozenset({"users", "audience_members"})))
    changes = await engine.drain_once()
    assert [(c.user_id, c.entered) for c in changes if c.segment == "vip-audience"] == [
        ("ann", True)]


# -- 17: no member row for a user who is gone --------------------------------------------


async def test_a_segment_over_events_alone_admits_no_user_who_is_gone(
        store: Store, tmp_path: Path) -> None:
    app = make_app()
    app.segment("buyers", sql="SELECT user_id AS id FROM events WHERE name = 'purchase'")
    clock = FakeClock(NOW)
    engine = SegmentService(kernel_for(store, app, clock, tmp_path))
    await engine.start()
    async with store.begin() as conn:  # events of an id with no user row
        await conn.execute(sa.text(
            "INSERT INTO events (user_id, name, attributes, created_at, received_at) "
            "VALUES ('ghost', 'purchase', '{}', :t, :t)"), {"t": NOW})
    engine.ingested(IngestBatch(users=frozenset({"ghost"}), events=()))
    await engine.drain_once()
    assert (await engine.refresh("buyers")).entered == 0
    async with store.connect() as conn:
        assert (await conn.execute(select(segment_members.c.user_id))).all() == []


async def test_mysql_an_evaluation_racing_a_forget_leaves_no_row_behind(
        mariadb_url: str, tmp_path: Path) -> None:
    """On MariaDB (READ COMMITTED) an evaluation reads the user's row while the forget is
    uncommitted and writes a member row the forget never sees. The round after the forget
    is handed on sweeps it and reports the exit."""
    store = Store.open(mariadb_url)
    await store.migrate()
    try:
        clock = FakeClock(NOW)
        sink = RecordingSink()
        engine = SegmentService(kernel_for(store, make_app(), clock, tmp_path),
                                membership_sinks=[sink])
        await engine.start()
        async with store.begin() as conn:
            await conn.execute(sa.insert(users).values(
                id="bo", email=None, attributes={"plan": "pro"}, created_at=NOW,
                updated_at=NOW))
        async with store.begin() as forget_conn:
            assert await forget_user(forget_conn, "bo", NOW)
            with anyio.fail_after(10):  # the evaluation does not wait for the forget
                await engine.evaluate_users(["bo"], only="pro")
        engine.ingested(IngestBatch(users=frozenset(), events=(),
                                    deleted=frozenset({"bo"})))
        await engine.drain_once()
        async with store.connect() as conn:
            assert (await conn.execute(select(segment_members.c.user_id))).all() == []
            assert (await conn.execute(select(segment_changes.c.user_id))).all() == []
        assert [(c.user_id, c.entered) for c in sink.changes if c.segment == "pro"] == [
            ("bo", True), ("bo", False)]
    finally:
        await store.close()


async def test_rows_a_refresh_wrote_for_a_user_forgotten_meanwhile_are_swept(
        h: H, committer: GroupCommitter) -> None:
    """A refresh on MySQL reads without locks: it can write a member row for a user whose
    forget commits while it runs. The row is swept and the exit reported."""
    await h.tell(await h.user("bo", plan="pro"))
    h.engine._state["pro"].refreshing = True
    await committer.submit([ForgetWrite("bo")])
    async with h.store.begin() as conn:  # what such a refresh commits afterwards
        await conn.execute(sa.insert(segment_members).values(
            segment="pro", user_id="bo", entered_at=NOW, evaluated_at=NOW))
        await conn.execute(sa.insert(segment_changes).values(
            segment="pro", user_id="bo", entered=True, at=NOW))
    h.engine._state["pro"].refreshing = False
    await h.engine.drain_once()
    async with h.store.connect() as conn:
        assert (await conn.execute(select(segment_members.c.user_id))).all() == []
        assert (await conn.execute(select(segment_changes.c.user_id)
                                   .where(segment_changes.c.user_id == "bo"))).all() == []
    assert await size_of(h, "pro") == 0


async def test_a_user_created_again_keeps_the_rows_of_their_new_life(
        h: H, committer: GroupCommitter) -> None:
    await h.tell(await h.user("bo", plan="pro"))
    await committer.submit([ForgetWrite("bo")])
    await committer.submit([UserWrite("bo", {"plan": "pro"}, recreate=True)])
    await h.engine.drain_once()
    assert await h.members("pro") == {"bo"}


# -- 18: segment.refresh waits for a place like scheduled refreshes ----------------------


async def test_segment_refresh_over_the_control_socket_waits_for_the_refresh_limit(
        h: H, monkeypatch: pytest.MonkeyPatch) -> None:
    running = 0
    most = 0
    real = h.engine._refresh_locked

    async def slow(*args: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await anyio.sleep(0.05)
            return await real(*args)
        finally:
            running -= 1

    monkeypatch.setattr(h.engine, "_refresh_locked", slow)
    action = h.kernel.actions["segment.refresh"]
    async with anyio.create_task_group() as tg:
        for name in ("big-spenders", "inactive-users", "new-users", "pro"):
            tg.start_soon(action, {"segment": name})
    assert most == refresh_module.REFRESH_CONCURRENCY
