"""A forget racing the segment engine on MariaDB (READ COMMITTED) and SQLite: refreshes,
sweeps, evaluations and audience syncs around a forget (issue #24, items 13 to 17).

Found by the adversarial review of that change; each test failed on it as reviewed."""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from test_segment_engine import NOW, H, harness, kernel_for, make_app

from segflowd.cursors import load_cursor
from segflowd.ingest import users as users_module
from segflowd.ingest.committer import GroupCommitter
from segflowd.ingest.eventinsert import EventInserter
from segflowd.ingest.users import forgotten_among
from segflowd.ingest.writes import EventWrite, ForgetWrite, UserWrite, apply_writes
from segflowd.schema import events, segment_changes, segment_members, users
from segflowd.segments import refresh as refresh_module
from segflowd.segments.engine import CURSOR_NAME, SegmentService
from segflowd.sources.audiences import _apply_batch
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> H:
    return await harness(store, tmp_path)


@pytest.fixture
async def committer(h: H) -> AsyncIterator[GroupCommitter]:
    c = GroupCommitter(h.store, h.clock, [h.engine])
    async with anyio.create_task_group() as tg:
        await tg.start(c.run)
        yield c
        tg.cancel_scope.cancel()


@pytest.fixture
async def maria(mariadb_url: str) -> AsyncIterator[Store]:
    store = Store.open(mariadb_url)
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


async def size_of(h: H, segment: str) -> int:
    return next(s.size for s in h.engine.statistics().segments if s.name == segment)


async def count_of(store: Store, segment: str) -> int:
    async with store.connect() as conn:
        return int((await conn.execute(
            sa.select(sa.func.count()).select_from(segment_members)
            .where(segment_members.c.segment == segment))).scalar() or 0)


async def lock_waits(store: Store, at_least: int = 1, limit: float = 30.0) -> None:
    """Until at least ``at_least`` MariaDB transactions wait for a lock."""
    with anyio.fail_after(limit):
        while True:
            async with store.connect() as conn:
                n = int((await conn.execute(sa.text(
                    "SELECT COUNT(*) FROM information_schema.INNODB_TRX "
                    "WHERE trx_state = 'LOCK WAIT'"))).scalar() or 0)
            if n >= at_least:
                return
            await anyio.sleep(0.1)


async def forget_while_pro_refreshes(h: H, maria: Store,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget bo while a refresh of "pro" has written its diff and not committed it (the
    forget waits for its rows), then let both finish and drain."""
    paused, go, refreshed = anyio.Event(), anyio.Event(), anyio.Event()
    real = refresh_module.refresh_diff

    async def held(conn: Any, seg: Any, now: Any) -> Any:
        out = await real(conn, seg, now)
        if seg.name == "pro":  # the diff is written, not yet committed
            paused.set()
            await go.wait()
        return out

    monkeypatch.setattr(refresh_module, "refresh_diff", held)
    committer = GroupCommitter(maria, h.clock, [h.engine])
    forgot = anyio.Event()

    async def refresh() -> None:
        await h.engine.refresh("pro")
        refreshed.set()

    async def forget() -> None:
        await committer.submit([ForgetWrite("bo")])
        forgot.set()

    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        tg.start_soon(refresh)
        await paused.wait()
        tg.start_soon(forget)
        await lock_waits(maria)  # the forget waits for the refresh's rows
        go.set()
        with anyio.fail_after(10):
            await forgot.wait()
            await refreshed.wait()
        for _ in range(3):
            await h.engine.drain_once()
        tg.cancel_scope.cancel()


def balanced(seen: list[tuple[str, bool]], uid: str) -> bool:
    """Whether the sink's last word on ``uid`` is an exit (or it never heard of them)."""
    mine = [entered for u, entered in seen if u == uid]
    return not mine or mine[-1] is False


# -- 1. forget's `left` is read without a lock: a refresh's uncommitted entry is missed --


async def test_mysql_a_forget_racing_a_refresh_reports_the_exit_and_recounts(
        maria: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refresh of "pro" has inserted bo's member row (uncommitted) when bo is forgotten.
    The forget reads ``left`` with a plain (consistent) read, so it does not see that row,
    then its DELETE waits for the refresh and deletes it after the refresh commits. The
    refresh counted bo in its size; nobody recounts, and no exit is reported."""
    h = await harness(maria, tmp_path)
    await h.user("bo", plan="pro")  # not evaluated yet: the refresh admits bo
    await forget_while_pro_refreshes(h, maria, monkeypatch)
    assert await count_of(maria, "pro") == 0
    assert balanced(h.sink.seen("pro"), "bo"), h.sink.seen("pro")
    assert await size_of(h, "pro") == 0


# -- 2. the sweep reads without a lock: rows of a refresh still uncommitted are deleted ---
#       but not reported


async def test_mysql_a_sweep_never_waits_for_a_refresh_and_reports_what_it_deletes(
        maria: Store, tmp_path: Path) -> None:
    """A long refresh statement read bo before the forget committed and writes bo's rows
    after it (what the sweep exists for). The drain round the forget wakes does not wait
    for those uncommitted rows (the segment is refreshing: skipped); once the refresh
    ends, the sweep deletes them, reports bo's exit and recounts."""
    h = await harness(maria, tmp_path)
    committer = GroupCommitter(maria, h.clock, [h.engine])
    await h.tell(await h.user("bo", plan="free"))
    st = h.engine._state["pro"]
    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        st.refreshing = True  # a refresh of "pro" runs
        await committer.submit([ForgetWrite("bo")])
        # What the refresh writes for bo after the forget committed (not yet committed).
        rconn = await maria.engine.connect()
        await rconn.begin()
        await rconn.execute(sa.insert(segment_members).values(
            segment="pro", user_id="bo", entered_at=NOW, evaluated_at=NOW))
        await rconn.execute(sa.insert(segment_changes).values(
            segment="pro", user_id="bo", entered=True, at=NOW))
        with anyio.fail_after(10):  # not held up by the refresh's rows
            out = list(await h.engine.drain_once())
        st.size = 1  # the refresh's count, in its own transaction, includes bo
        await rconn.commit()
        await rconn.close()
        # The refresh ends (what refresh()'s finally does).
        st.refreshing = False
        h.engine._sweep |= st.forgotten_during
        st.forgotten_during = set()
        out.extend(await h.engine.drain_once())
        tg.cancel_scope.cancel()
    assert await count_of(maria, "pro") == 0
    assert ("pro", "bo", False) in [(c.segment, c.user_id, c.entered) for c in out]
    assert await size_of(h, "pro") == 0


# -- 4. lock order: forgets lock users in request order, evaluations in id order ----------


async def test_mysql_a_flush_with_a_forget_does_not_deadlock_an_evaluation(
        maria: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush forgets "zz" (X lock on zz), then updates "aa" (X lock on aa). An
    evaluation of [aa, zz] that read them FOR SHARE in id order took S on aa, then waited
    for zz, and the flush then waited for aa: a deadlock (1213). It reads without locks."""
    h = await harness(maria, tmp_path)
    await h.tell(await h.user("aa", plan="pro"), await h.user("zz", plan="pro"))
    forgotten_zz, go = anyio.Event(), anyio.Event()
    real = users_module.upsert_users

    async def upsert(*args: Any, **kw: Any) -> Any:
        forgotten_zz.set()  # the flush's forgets are done: zz is locked
        await go.wait()
        return await real(*args, **kw)

    monkeypatch.setattr(users_module, "upsert_users", upsert)
    errors: list[BaseException] = []

    async def flush() -> None:
        try:
            async with maria.engine.connect() as conn, conn.begin():
                await apply_writes(maria, conn, [[ForgetWrite("zz")],
                                                 [UserWrite("aa", {"plan": "free"})]],
                                   h.clock.now(), False, set(),
                                   EventInserter(maria, conn.dialect))
        except Exception as exc:
            errors.append(exc)

    async def evaluate() -> None:
        try:
            await h.engine.evaluate_users(["aa", "zz"], only="pro")
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(flush)
        await forgotten_zz.wait()
        with anyio.fail_after(10):  # the evaluation waits for none of the flush's locks
            await evaluate()
        go.set()
    assert errors == []


# -- 5. the segments cursor starves while refreshes overlap -------------------------------


async def test_the_cursor_moves_on_while_refreshes_take_turns(h: H) -> None:
    """Two segments refresh in turn (REFRESH_CONCURRENCY keeps one running at all times
    on a store whose refreshes are long). Every round defers its users for the one
    refreshing, so no round ends with ``_deferred`` empty and the cursor is never saved:
    a restart catches up from the daemon's start, however long ago."""
    a, b = h.engine._state["pro"], h.engine._state["new-users"]
    ids = []
    for i in range(6):
        a.refreshing, b.refreshing = i % 2 == 0, i % 2 == 1
        h.clock._now += dt.timedelta(minutes=5)
        uid = f"u{i}"
        await h.user(uid)
        batch = await h.event(uid, "login")
        ids.append(batch.events[0].id)
        await h.tell(batch)
    await h.engine.drain()
    async with h.store.connect() as conn:
        cursor = await load_cursor(conn, CURSOR_NAME)
    assert cursor is not None
    # Only u5 (the last round) still waits: every event before round 5 was evaluated for
    # every segment, so the cursor may stand just before it.
    assert cursor.last_event_id >= ids[3], (cursor, ids)


# -- 6. a refresh's exit and the forget's exit: the sinks hear bo leave twice -------------


async def test_mysql_a_forget_racing_a_refreshs_exit_reports_one_exit(
        maria: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = await harness(maria, tmp_path)
    await h.tell(await h.user("bo", plan="pro"))
    assert await h.members("pro") == {"bo"}
    async with maria.begin() as conn:  # bo no longer matches; not evaluated yet
        await conn.execute(sa.update(users).where(users.c.id == "bo").values(
            attributes={"plan": "free"}))
    await forget_while_pro_refreshes(h, maria, monkeypatch)
    assert h.sink.seen("pro") == [("bo", True), ("bo", False)]


# -- 7. the group committer waits for segment evaluations (FOR SHARE on users) ------------


async def test_mysql_ingest_does_not_wait_for_a_slow_segment_evaluation(
        maria: Store, tmp_path: Path) -> None:
    """Every incremental evaluation now holds FOR SHARE locks on up to DRAIN_BATCH users
    for the whole of its transaction (the segment's query included). The single group
    committer's UPDATE of any of those users waits for it: all ingest stalls behind the
    slowest segment, and past innodb_lock_wait_timeout the whole flush fails (503)."""
    app = make_app()
    app.segment("slow", sql="SELECT id FROM users WHERE SLEEP(1) = 0")
    clock = FakeClock(NOW)
    engine = SegmentService(kernel_for(maria, app, clock, tmp_path))
    await engine.start()
    async with maria.begin() as conn:
        await conn.execute(sa.insert(users).values(
            id="bo", email=None, attributes={}, created_at=NOW, updated_at=NOW))
    committer = GroupCommitter(maria, clock, [])
    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        tg.start_soon(functools.partial(engine.evaluate_users, ["bo"], only="slow"))
        await anyio.sleep(0.3)  # the evaluation holds bo's row and runs its query
        t0 = time.monotonic()
        await committer.submit([UserWrite("bo", {"plan": "pro"})])
        waited = time.monotonic() - t0
        tg.cancel_scope.cancel()
    assert waited < 0.3, f"an attribute update waited {waited:.2f}s for a segment"


# -- 8. an audience sync deletes a user it did not create --------------------------------


async def test_an_audience_sync_never_deletes_a_user_it_did_not_create(
        store: Store, tmp_path: Path) -> None:
    """The sync computes its window once, at its start; ingest per flush. A sync that
    started before a tombstone left the window reaches bo's batch after ingest, already
    past the window, created bo again from an event. The sync reads the tombstone as
    "within the window" and DELETEs bo's users row, and only that row: bo's event (and
    any member rows, instances) stay, for a user who no longer exists."""
    window = dt.timedelta(days=30)
    now = NOW
    clock = FakeClock(now - window - dt.timedelta(minutes=1))  # the forget, 30 days ago
    committer = GroupCommitter(store, clock, [], forget_window=window.total_seconds())
    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        await committer.submit([UserWrite("bo", {"plan": "free"})])
        await committer.submit([ForgetWrite("bo")])
        clock._now = now  # 30 days and a minute later: ingest takes bo again
        res = await committer.submit([EventWrite("login", {}, None, user_id="bo")])
        assert not res.refused
        tg.cancel_scope.cancel()
    sync_started = now - dt.timedelta(minutes=2)  # a long sync, begun two minutes ago
    async with store.begin() as conn:
        assert await forgotten_among(conn, ["bo"], sync_started - window) == {"bo"}
        await _apply_batch(store, conn, "vip", {"bo": {"profile_id": "bo", "plan": "pro"}},
                           now, sync_started - window)
    async with store.connect() as conn:
        assert (await conn.execute(sa.select(users.c.id))).scalars().all() == ["bo"]
        assert (await conn.execute(sa.select(events.c.user_id))).scalars().all() == ["bo"]
