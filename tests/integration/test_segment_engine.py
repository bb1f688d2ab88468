"""The segment engine on real stores (SQLite and MariaDB): the reference README's segments
in the DSL, incremental entries and exits, scheduled refresh, the race rule, catch-up."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import func, select

from segflowd.app import Segflow, ago
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.cursors import load_cursor
from segflowd.errors import AppError
from segflowd.hooks import IngestBatch, MembershipChange, StoredEvent
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import events, segment_changes, segment_members, segment_state, users
from segflowd.segments import engine as segment_engine
from segflowd.segments.engine import SegmentService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 3, 1, 12, 0, 0)


def make_app() -> Segflow:
    app = Segflow(templates="templates")

    @app.segment("big-spenders")
    def big_spenders():  # type: ignore[no-untyped-def]
        amount = events.c.attributes["amount"].as_float()
        return (select(users.c.id).join(events, events.c.user_id == users.c.id)
                .where(events.c.name == "purchase").group_by(users.c.id)
                .having(func.sum(amount) > 1000))

    app.segment("inactive-users", refresh="15m",
                sql="SELECT user_id AS id FROM events WHERE name = 'login' "
                    "AND user_id IS NOT NULL GROUP BY user_id HAVING MAX(created_at) < :cutoff",
                params={"cutoff": ago(days=30)})

    @app.segment("new-users", refresh="1h")
    def new_users():  # type: ignore[no-untyped-def]
        return select(users.c.id).where(users.c.created_at >= ago(days=7))

    @app.segment("pro", refresh="1d")
    def pro():  # type: ignore[no-untyped-def]
        return select(users.c.id).where(users.c.attributes["plan"].as_string() == "pro")

    @app.campaign("winback", segments=["inactive-users"], exclude=["big-spenders"])
    def winback(ctx, rt):  # type: ignore[no-untyped-def]
        yield rt.send_email("we-miss-you")

    return app


class RecordingSink:
    def __init__(self) -> None:
        self.changes: list[MembershipChange] = []
        self.calls = 0

    async def membership_changed(self, changes: Sequence[MembershipChange]) -> None:
        self.calls += 1
        self.changes.extend(changes)

    def seen(self, segment: str) -> list[tuple[str, bool]]:
        return [(c.user_id, c.entered) for c in self.changes if c.segment == segment]


@dataclasses.dataclass
class H:
    store: Store
    clock: FakeClock
    kernel: Kernel
    sink: RecordingSink
    engine: SegmentService
    ids: itertools.count[int]

    async def user(self, uid: str, *, created: dt.datetime | None = None,
                   **attributes: object) -> IngestBatch:
        now = self.clock.now()
        async with self.store.begin() as conn:
            await conn.execute(sa.insert(users).values(
                id=uid, email=f"{uid}@example.com", attributes=attributes,
                created_at=created or now, updated_at=now))
        return IngestBatch(users=frozenset({uid}), events=())

    async def event(self, uid: str, name: str, *, at: dt.datetime | None = None,
                    **attributes: object) -> IngestBatch:
        now = self.clock.now()
        async with self.store.begin() as conn:
            res = await conn.execute(sa.insert(events).values(
                user_id=uid, name=name, attributes=attributes, created_at=at or now,
                received_at=now))
        pk = res.inserted_primary_key
        assert pk is not None
        e = StoredEvent(id=int(pk[0]), user_id=uid, anonymous_id=None, name=name,
                        attributes=attributes, created_at=at or now, received_at=now)
        return IngestBatch(users=frozenset({uid}), events=(e,))

    async def member_from_a_newer_evaluation(self, segment: str, uid: str) -> None:
        """A member row put there by an evaluation 5 minutes after the clock's now."""
        later = self.clock.now() + dt.timedelta(minutes=5)
        async with self.store.begin() as conn:
            await conn.execute(sa.insert(segment_members).values(
                segment=segment, user_id=uid, entered_at=later, evaluated_at=later))

    async def members(self, segment: str) -> set[str]:
        async with self.store.connect() as conn:
            return {str(u) for u in (await conn.execute(
                select(segment_members.c.user_id)
                .where(segment_members.c.segment == segment))).scalars()}

    async def tell(self, *batches: IngestBatch) -> list[MembershipChange]:
        for b in batches:
            self.engine.ingested(b)
        return await self.engine.drain_once()


def kernel_for(store: Store, app: Segflow, clock: FakeClock, tmp_path: Path) -> Kernel:
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                    '[providers.outbox]\nplugin = "outbox"\n')
    return Kernel(config=load_config(path, environ={}), app=app, store=store, clock=clock,
                  bus=Bus(), metrics=Metrics())


async def harness(store: Store, tmp_path: Path) -> H:
    """A started engine over ``make_app()`` at NOW, telling a RecordingSink."""
    clock = FakeClock(NOW)
    kernel = kernel_for(store, make_app(), clock, tmp_path)
    sink = RecordingSink()
    engine = SegmentService(kernel, membership_sinks=[sink])
    await engine.start()
    return H(store, clock, kernel, sink, engine, itertools.count())


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> H:
    return await harness(store, tmp_path)


async def test_big_spender_enters_within_one_drain_of_the_purchase_that_crosses_1000(
        h: H) -> None:
    sub = h.kernel.bus.subscribe(kinds=frozenset({"segment"}))
    await h.tell(await h.user("ann"), await h.event("ann", "purchase", amount=600))
    assert await h.members("big-spenders") == set()
    crossing = await h.event("ann", "purchase", amount=500.5)
    changes = await h.tell(crossing)
    assert await h.members("big-spenders") == {"ann"}
    entry = [c for c in changes if c.segment == "big-spenders"]
    assert [(c.user_id, c.entered, c.event_id) for c in entry] == [
        ("ann", True, crossing.events[0].id)]
    assert h.sink.seen("big-spenders") == [("ann", True)]
    published, _ = sub.drain()
    assert any(e.kind == "segment.entered" and e.data == {"segment": "big-spenders",
                                                          "user_id": "ann"}
               for e in published)


async def test_member_exits_when_they_stop_matching(h: H) -> None:
    await h.tell(await h.user("bo", plan="pro"))
    assert await h.members("pro") == {"bo"}
    async with h.store.begin() as conn:
        await conn.execute(sa.update(users).where(users.c.id == "bo")
                           .values(attributes={"plan": "free"}, updated_at=h.clock.now()))
    await h.tell(IngestBatch(users=frozenset({"bo"}), events=()))
    assert await h.members("pro") == set()
    assert h.sink.seen("pro") == [("bo", True), ("bo", False)]
    async with h.store.connect() as conn:
        stored = (await conn.execute(
            select(segment_changes.c.user_id, segment_changes.c.entered, segment_changes.c.at)
            .where(segment_changes.c.segment == "pro").order_by(segment_changes.c.id))).all()
    assert [(r[0], bool(r[1]), r[2]) for r in stored] == [("bo", True, NOW), ("bo", False, NOW)]


async def test_inactive_users_enter_on_refresh_after_30_days_and_leave_on_login(h: H) -> None:
    await h.tell(await h.user("cy"), await h.event("cy", "login"))
    await h.engine.refresh("inactive-users")
    assert await h.members("inactive-users") == set()
    await h.clock.advance(days=31)
    result = await h.engine.refresh("inactive-users")
    assert (result.entered, result.exited, result.size) == (1, 0, 1)
    assert await h.members("inactive-users") == {"cy"}
    await h.tell(await h.event("cy", "login"))
    assert await h.members("inactive-users") == set()
    assert h.sink.seen("inactive-users") == [("cy", True), ("cy", False)]


async def test_new_users_enter_at_signup_and_a_scheduled_refresh_moves_them_out(h: H) -> None:
    await h.tell(await h.user("di"), await h.user("ed", created=NOW - dt.timedelta(days=9)))
    assert await h.members("new-users") == {"di"}
    await h.clock.advance(days=8)
    results = {r.segment: r for r in await h.engine.refresh_due()}
    assert results["new-users"].exited == 1
    assert await h.members("new-users") == set()
    await h.tell(await h.user("fay"))
    assert await h.members("new-users") == {"fay"}


async def test_sinks_see_changes_of_every_segment_so_exclude_can_be_applied(h: H) -> None:
    """winback = inactive-users minus big-spenders: both segments' changes reach the sink."""
    old = NOW - dt.timedelta(days=40)
    await h.tell(await h.user("gus"), await h.event("gus", "login", at=old),
                 await h.event("gus", "purchase", amount=5000))
    await h.engine.refresh("inactive-users")
    assert h.sink.seen("inactive-users") == [("gus", True)]
    assert h.sink.seen("big-spenders") == [("gus", True)]
    campaign = h.kernel.app.campaigns["winback"]
    state = {s: "gus" in await h.members(s) for s in (*campaign.segments, *campaign.exclude)}
    assert state == {"inactive-users": True, "big-spenders": True}


async def test_scheduled_refresh_task_moves_users_in_and_out_as_the_clock_advances(
        h: H) -> None:
    await h.user("hal")
    await h.event("hal", "login")
    async with anyio.create_task_group() as tg:
        await tg.start(h.engine.run)
        await wait_for(lambda: h.engine.statistics().refreshes >= 4)
        assert await h.members("inactive-users") == set()
        assert await h.members("new-users") == {"hal"}  # the first refresh covers history
        h.clock.set(NOW + dt.timedelta(days=31))  # the wall clock jumps; then sleepers wake
        await h.clock.advance(minutes=15)
        await wait_for(lambda: h.engine.statistics().refreshes >= 6)
        await wait_for_async(lambda: h.members("inactive-users"), {"hal"})
        await wait_for_async(lambda: h.members("new-users"), set())
        h.engine.ingested(await h.event("hal", "login"))
        await wait_for_async(lambda: h.members("inactive-users"), set())
        await wait_for(lambda: not any(s.refreshing for s in h.engine.statistics().segments))
        await h.engine.drain()  # as the daemon does before it cancels its services
        tg.cancel_scope.cancel()
    stats = h.engine.statistics()
    info = {s.name: s for s in stats.segments}
    assert info["inactive-users"].next_refresh_at == (
        info["inactive-users"].last_refresh_at + dt.timedelta(minutes=15))  # type: ignore[operator]


async def test_incremental_result_arriving_during_a_refresh_is_applied_after_it(h: H) -> None:
    """The race rule: the user's newer (incremental) result wins over the refresh's."""
    await h.user("ivy", plan="pro")

    class FlipDuringRefresh(RecordingSink):
        async def membership_changed(self, changes: Sequence[MembershipChange]) -> None:
            await super().membership_changed(changes)
            if self.calls == 1:  # inside the refresh: the user leaves "pro" meanwhile
                async with h.store.begin() as conn:
                    await conn.execute(sa.update(users).where(users.c.id == "ivy")
                                       .values(attributes={"plan": "free"}))
                # Evaluated while the refresh holds the segment: deferred, not blocked.
                assert await h.engine.evaluate_users(["ivy"], only="pro") == []
    sink = FlipDuringRefresh()
    h.engine.sinks = [sink]
    result = await h.engine.refresh("pro")
    assert result.entered == 1
    assert await h.members("pro") == {"ivy"}
    await h.engine.drain_once()
    assert await h.members("pro") == set()
    assert sink.seen("pro") == [("ivy", True), ("ivy", False)]


async def test_a_refresh_never_removes_a_member_put_there_by_a_newer_evaluation(h: H) -> None:
    await h.user("jo", plan="free")
    await h.member_from_a_newer_evaluation("pro", "jo")
    result = await h.engine.refresh("pro")
    assert (result.exited, result.size) == (0, 1)
    assert await h.members("pro") == {"jo"}


async def test_broken_segment_is_reported_by_name_and_the_others_keep_working(
        store: Store, tmp_path: Path) -> None:
    app = make_app()
    app.segment("broken", sql="SELECT id FROM no_such_table")
    clock = FakeClock(NOW)
    kernel = kernel_for(store, app, clock, tmp_path)
    engine = SegmentService(kernel)
    await engine.start()
    info = {s.name: s for s in engine.statistics().segments}
    assert info["broken"].last_error is not None
    assert "'broken'" in info["broken"].last_error
    assert "no_such_table" in info["broken"].last_error
    with pytest.raises(AppError, match="no_such_table"):
        await kernel.actions["segment.refresh"]({"segment": "broken"})
    async with store.connect() as conn:
        saved = (await conn.execute(select(segment_state.c.last_error)
                                    .where(segment_state.c.segment == "broken"))).scalar()
    assert saved is not None
    assert "no_such_table" in saved
    h = H(store, clock, kernel, RecordingSink(), engine, itertools.count())
    await h.tell(await h.user("kit", plan="pro"))
    assert await h.members("pro") == {"kit"}


async def test_refresh_action_returns_counts_and_statistics_track_size(h: H) -> None:
    for uid in ("la", "lu"):
        await h.user(uid, plan="pro")
    out = await h.kernel.actions["segment.refresh"]({"segment": "pro"})
    assert isinstance(out, dict)
    assert (out["segment"], out["entered"], out["exited"], out["size"]) == ("pro", 2, 0, 2)
    stats = h.kernel.stats["segments"]()
    assert {s.name: s.size for s in stats.segments}["pro"] == 2  # type: ignore[attr-defined]
    assert 'segflow_segment_members{segment="pro"} 2' in h.kernel.metrics.render()
    with pytest.raises(ValueError, match="unknown segment 'nope'"):
        await h.kernel.actions["segment.refresh"]({"segment": "nope"})


async def test_users_committed_while_the_engine_was_down_are_evaluated_at_start(
        h: H, tmp_path: Path) -> None:
    """Durable catch-up: nothing was handed over in memory, the cursor finds them."""
    await h.tell(await h.user("mo", plan="free"))
    await h.clock.advance(minutes=5)
    await h.user("ned", plan="pro")  # committed, never handed over: "crash"
    await h.event("mo", "purchase", amount=2000)
    again = SegmentService(h.kernel, membership_sinks=[h.sink])
    await again.start()
    changes = await again.drain_once()
    assert {(c.segment, c.user_id) for c in changes} >= {("pro", "ned"),
                                                         ("big-spenders", "mo")}
    assert await h.members("pro") == {"ned"}


POLL = 0.01  # seconds between looks at the store while a background task works
POLLS = 2000  # looks before giving up (the per-test timeout is the real bound)


async def wait_for(cond: Callable[[], bool]) -> None:
    for _ in range(POLLS):
        if cond():
            return
        await anyio.sleep(POLL)
    pytest.fail("condition not reached")


async def wait_for_async(get: Callable[[], Awaitable[object]], want: object) -> None:
    for _ in range(POLLS):
        if await get() == want:
            return
        await anyio.sleep(POLL)
    pytest.fail(f"never became {want!r}")


async def test_a_segment_returning_a_user_twice_enters_them_once_and_keeps_them(
        store: Store, tmp_path: Path) -> None:
    app = make_app()
    # No DISTINCT: a buyer of two things is two rows of this segment's result.
    app.segment("buyers", sql="SELECT user_id AS id FROM events WHERE name = 'purchase'")
    clock = FakeClock(NOW)
    sink = RecordingSink()
    engine = SegmentService(kernel_for(store, app, clock, tmp_path), membership_sinks=[sink])
    await engine.start()
    h = H(store, clock, engine.k, sink, engine, itertools.count())
    await h.tell(await h.user("max"), await h.event("max", "purchase", amount=1),
                 await h.event("max", "purchase", amount=2))
    await h.tell(await h.event("max", "purchase", amount=3))
    assert await h.members("buyers") == {"max"}
    assert h.sink.seen("buyers") == [("max", True)]


async def test_an_incremental_evaluation_leaves_a_newer_evaluations_member_alone(h: H) -> None:
    await h.user("ned", plan="free")
    await h.member_from_a_newer_evaluation("pro", "ned")
    await h.tell(IngestBatch(users=frozenset({"ned"}), events=()))
    assert await h.members("pro") == {"ned"}
    assert h.sink.seen("pro") == []
    await h.clock.advance(minutes=10)  # now the stored result is the older one
    await h.tell(IngestBatch(users=frozenset({"ned"}), events=()))
    assert await h.members("pro") == set()
    assert h.sink.seen("pro") == [("ned", False)]


async def _stored_cursor(store: Store, name: str) -> int | None:
    async with store.connect() as conn:
        cursor = await load_cursor(conn, name)
    return None if cursor is None else cursor.last_event_id


async def test_the_cursor_is_saved_at_most_once_a_second_and_never_lost(
        h: H, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment_engine, "SAVE_INTERVAL", 0.2)
    first = await h.event("pia", "purchase", amount=10)
    await h.tell(first)  # the first round saves its cursor
    assert await _stored_cursor(h.store, "segments") == first.events[0].id
    later = [await h.event("pia", "purchase", amount=10) for _ in range(3)]
    for batch in later:  # rounds within the interval: no write transaction each
        await h.tell(batch)
    assert await _stored_cursor(h.store, "segments") == first.events[0].id
    # The drain loop comes back for the save it put off once the interval is over ...
    async with anyio.create_task_group() as tg:
        await tg.start(h.engine.run)
        await wait_for_async(lambda: _stored_cursor(h.store, "segments"),
                             later[-1].events[0].id)
        tg.cancel_scope.cancel()
    # ... and a shutdown saves it at once.
    last = await h.event("pia", "purchase", amount=10)
    await h.tell(last)
    await h.engine.drain()
    assert await _stored_cursor(h.store, "segments") == last.events[0].id


async def test_a_segment_whose_params_miss_its_sql_binds_is_broken_and_the_rest_run(
        store: Store, tmp_path: Path) -> None:
    """#16 defect 3: ``params={"cutof": ...}`` against ``:cutoff`` is logged as broken at
    start (no SQLAlchemy traceback, the daemon starts) and the other segments run."""
    app = make_app()
    app.segment("typo", sql="SELECT user_id AS id FROM events GROUP BY user_id "
                            "HAVING MAX(created_at) < :cutoff", params={"cutof": ago(days=30)})
    clock = FakeClock(NOW)
    kernel = kernel_for(store, app, clock, tmp_path)
    engine = SegmentService(kernel)
    await engine.start()
    info = {s.name: s for s in engine.statistics().segments}
    error = info["typo"].last_error
    assert error is not None
    assert ":cutoff" in error
    assert "'cutof'" in error
    h = H(store, clock, kernel, RecordingSink(), engine, itertools.count())
    await h.tell(await h.user("kit", plan="pro"))
    assert await h.members("pro") == {"kit"}
