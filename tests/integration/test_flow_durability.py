"""Flows: the crash, race and pause windows of the durability review, on real stores.

Each test reproduces one finding deterministically (a stopped service stands for a kill
between the commit and the hand-off; a patched read widens a race to a certainty).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
from collections.abc import Generator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from test_flows import DAY, Harness, awaiting, make_app, onboarding

from segflowd.cursors import load_cursor
from segflowd.errors import FlowError, StoreUnavailable
from segflowd.flows import entries as entries_module
from segflowd.flows import steps as steps_module
from segflowd.flows import work as flows_work
from segflowd.flows.entries import CHANGES_CURSOR
from segflowd.flows.wakes import CURSOR_NAME
from segflowd.hooks import IngestBatch, MembershipChange
from segflowd.schema import (
    SCHEMA_VERSION,
    flow_instances,
    flow_journal,
    messages,
    schema_version,
    segment_changes,
    segment_members,
)
from segflowd.segments import refresh as refresh_module
from segflowd.segments.engine import SegmentService
from segflowd.segments.outputs import MembershipOutputs
from segflowd.store import Store

pytestmark = pytest.mark.anyio


@pytest.fixture
def h(store: Store, tmp_path: Path) -> Harness:
    return Harness(store, tmp_path)


def lose_the_commit_reply(h: Harness, monkeypatch: pytest.MonkeyPatch, kind: str
                          ) -> list[int]:
    """The first round that steps a ``kind`` command commits, but the stepper hears
    'lost connection' (MySQL 2013) at COMMIT. The list reads [1, 2] once that happened."""
    real_write_all = steps_module.Stepper._write_all
    armed: list[int] = []

    async def write_all(self: Any, conn: Any, runs: Any, now: Any) -> None:
        await real_write_all(self, conn, runs, now)
        if not armed and any(r.cmd is not None and r.cmd.kind == kind and not r.end
                             for r in runs):
            armed.append(1)

    monkeypatch.setattr(steps_module.Stepper, "_write_all", write_all)
    real_begin = h.store.begin

    @contextlib.asynccontextmanager
    async def begin() -> Any:
        async with real_begin() as conn:
            yield conn
        if armed == [1]:  # committed; the step hears otherwise
            armed.append(2)
            raise OperationalError("COMMIT", {}, Exception(
                "(2013, 'Lost connection to server during query')"))

    monkeypatch.setattr(h.store, "begin", begin)
    return armed


async def test_an_event_committed_before_a_crash_wakes_its_wait_at_the_next_start(
        h: Harness) -> None:
    """Finding 1: the hand-off died with the process; the cursor finds the event."""
    app = make_app("cart", awaiting)
    await h.user("ann")
    async with h.running(app):
        await h.join("ann", "seg")
        await h.advance(0.5 * DAY)
    # committed (the client had its 2xx), but no flows process heard of it
    await h.committed_event("ann", "purchase", amount=30)
    async with h.running(app):
        await h.advance(3 * DAY)  # past the timeout: it must not be what happened
    assert await h.sent("ann") == [("thanks", 0.5)]


async def test_an_event_before_the_wait_began_does_not_wake_it_after_a_crash(
        h: Harness) -> None:
    """The catch-up matches only events stored after the wait began (wait_after)."""
    app = make_app("cart", awaiting)
    await h.user("bob")
    await h.committed_event("bob", "purchase", amount=1)  # before anything waits
    async with h.running(app):
        await h.join("bob", "seg")
    async with h.running(app):
        await h.advance(3 * DAY)
    assert await h.sent("bob") == [("nudge", 2)]


async def test_the_wake_cursor_passes_only_stepped_wakes_and_is_saved_at_shutdown(
        h: Harness) -> None:
    app = make_app("cart", awaiting)
    await h.user("cy")
    async with h.running(app) as svc:
        await h.join("cy", "seg")
        batch = await h.committed_event("cy", "purchase", amount=2)
        eid = batch.events[0].id
        svc.ingested(batch)
        assert svc._safe_cursor() < eid  # matched, not yet stepped
        await h.settle()
        assert svc._safe_cursor() >= eid
        await svc.drain()  # the daemon's shutdown: the cursor is saved as far as it is safe
    async with h.store.connect() as conn:
        cursor = await load_cursor(conn, CURSOR_NAME)
    assert cursor is not None
    assert cursor.last_event_id >= eid
    assert await h.sent("cy") == [("thanks", 0)]


async def test_an_event_while_the_campaign_is_paused_wakes_its_wait_on_resume(
        h: Harness) -> None:
    """Finding 2: the stepper drops a paused campaign's wakes; resume finds the event."""
    app = make_app("cart", awaiting)
    await h.user("dee")
    async with h.running(app) as svc:
        await h.join("dee", "seg")
        await svc.k.actions["campaign.pause"]({"campaign": "cart"})
        await h.advance(0.5 * DAY)
        await h.event("dee", "purchase", amount=7)
        await h.advance(0.5 * DAY)
        await svc.k.actions["campaign.resume"]({"campaign": "cart"})
        await h.advance(3 * DAY)
    assert await h.sent("dee") == [("thanks", 1.0)]


async def test_an_event_racing_the_step_that_begins_the_wait_still_wakes_it(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event commits after the wait's high-water mark was read and is handed off
    before the wait is visible: the check after the commit finds it in the store."""
    app = make_app("cart", awaiting)
    await h.user("eve")
    real = steps_module.max_event_id
    raced: list[int] = []

    async def racing_read(conn: Any) -> int:
        if raced:
            return await real(conn)
        async with h.store.connect() as other:  # (SQLite: before conn holds a snapshot)
            mark = await real(other)
        batch = await h.committed_event("eve", "purchase", amount=9)
        raced.append(batch.events[0].id)
        assert h.svc is not None
        h.svc.ingested(batch)  # the fast path looks now: nothing waits yet
        return mark

    monkeypatch.setattr(steps_module, "max_event_id", racing_read)
    async with h.running(app):
        await h.join("eve", "seg")
        await h.advance(3 * DAY)
    assert raced
    assert await h.sent("eve") == [("thanks", 0)]


def loops(ctx: Any, rt: Any) -> Generator[object, object, object]:
    for i in range(40):
        yield rt.send_email(f"n{i}")


async def test_pausing_stops_a_batch_between_rounds_and_resume_goes_on(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 14: a pause takes effect at the next round, not 1,000 steps later."""
    app = make_app("loop", loops)
    await h.user("fil")
    real = steps_module.Stepper._round
    rounds = 0

    async def counting(self: Any, runs: Any) -> None:
        nonlocal rounds
        await real(self, runs)
        rounds += 1
        if rounds == 3:
            self.svc.paused.add("loop")  # as campaign.pause does, mid-batch

    monkeypatch.setattr(steps_module.Stepper, "_round", counting)
    async with h.running(app) as svc:
        await h.join("fil", "seg")
        (inst,) = await h.instances("fil")
        assert (inst.status, inst.seq) == ("running", 3)
        assert len(await h.sent("fil")) == 3
        await svc.k.actions["campaign.resume"]({"campaign": "loop"})
        await h.settle()
    (inst,) = await h.instances("fil")
    assert inst.status == "completed"
    assert [t for t, _ in await h.sent("fil")] == [f"n{i}" for i in range(40)]


def overflowing(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("hello")
    if ctx.user.get("huge"):
        yield rt.wait(days=10**300)  # an OverflowError-sized wait
    yield rt.send_email("bye")


def exiting(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("hello")
    raise SystemExit(3)


async def test_one_instances_bad_wait_or_exit_fails_it_alone_in_its_batch(
        h: Harness) -> None:
    """Finding 6: the others of the batch complete; nothing stays running."""
    app = make_app("ovf", overflowing)
    for uid, huge in [("g1", False), ("g2", True), ("g3", False)]:
        await h.user(uid, huge=huge)
    async with h.running(app) as svc:
        for uid in ("g1", "g2", "g3"):
            await h.join(uid, "seg")
        await h.advance(DAY)
        assert svc.statistics().failures == 1
    got = {i.user_id: (i.status, i.error or "") for i in await h.instances()}
    assert got["g1"][0] == got["g3"][0] == "completed"
    assert got["g2"][0] == "failed"
    assert "hundred years" in got["g2"][1]
    h2 = make_app("sx", exiting)
    await h.user("g4")
    async with h.running(h2):
        await h.join("g4", "seg")
    (inst,) = await h.instances("g4")
    assert inst.status == "failed"
    assert "SystemExit" in inst.error


def swallowing(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("one")
    try:
        plan = ctx.user.get("plan")
    except:  # noqa: E722  # the point: a bare except in a team's flow
        plan = None
    yield rt.send_email(f"plan-{plan}")


async def test_a_bare_except_in_a_flow_cannot_hide_a_divergence(h: Harness) -> None:
    """Journal replay: a read the journal never recorded is a divergence, even when the
    flow's own bare ``except:`` catches the replay's signal."""
    def before(ctx: Any, rt: Any) -> Generator[object, object, object]:
        yield rt.send_email("one")
        yield rt.wait(days=1)
        yield rt.send_email("plan-None")

    def after(ctx: Any, rt: Any) -> Generator[object, object, object]:
        yield rt.send_email("one")
        try:
            plan = ctx.user.get("plan")  # new read before the journaled wait
        except:  # noqa: E722
            plan = None
        yield rt.wait(days=1)
        yield rt.send_email(f"plan-{plan}")

    await h.user("hal", plan="pro")
    async with h.running(make_app("b", before)):
        await h.join("hal", "seg")
    async with h.running(make_app("b", after)):
        await h.advance(2 * DAY)
    (inst,) = await h.instances("hal")
    assert inst.status == "diverged"
    assert [t for t, _ in await h.sent("hal")] == ["one"]


async def test_an_overlong_value_the_store_refuses_fails_the_instance_alone(
        h: Harness) -> None:
    """Finding 6: a DataError in a one-step round used to leave the instance running."""
    if h.store.dialect == "sqlite":
        pytest.skip("SQLite stores any length: the refusal is MariaDB's")

    def overlong(ctx: Any, rt: Any) -> Generator[object, object, object]:
        yield rt.wait_for_event("x" * 400, timeout=60)

    await h.user("ivy")
    async with h.running(make_app("long", overlong)):
        await h.join("ivy", "seg")
    (inst,) = await h.instances("ivy")
    assert inst.status == "failed"
    assert inst.live is None
    async with h.store.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(
            flow_journal))).scalar() == 0


async def test_exit_and_terminate_do_not_overwrite_a_status_written_meanwhile(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 12: on READ COMMITTED the instance may complete between the read and the
    update; the update is conditional, so the completion stands."""
    if h.store.dialect == "sqlite":
        pytest.skip("SQLite serialises writers: no read-then-update window")
    app = make_app("cart", awaiting, behavior="dynamic")
    await h.user("jo")
    await h.user("kim")
    async with h.running(app) as svc:
        await h.join("jo", "seg")
        await h.join("kim", "seg")
        real_begin = h.store.begin

        async def complete(uid: str) -> None:  # another writer: the step that completes it
            async with real_begin() as other:
                await other.execute(sa.update(flow_instances).where(
                    flow_instances.c.user_id == uid).values(
                    status="completed", live=None, ended_at=h.clock.now()))

        class Racing:
            """A connection on which the instance completes right after each read."""

            def __init__(self, conn: Any) -> None:
                self.conn = conn

            async def execute(self, stmt: Any, *a: Any, **kw: Any) -> Any:
                res = await self.conn.execute(stmt, *a, **kw)
                if isinstance(stmt, sa.Select):
                    await complete("jo")
                return res

        @contextlib.asynccontextmanager
        async def exit_race() -> Any:
            async with real_begin() as conn:
                yield Racing(conn)

        monkeypatch.setattr(h.store, "begin", exit_race)
        assert await svc.exit_user("cart", "jo") is None

        @contextlib.asynccontextmanager
        async def terminate_race() -> Any:  # after terminate read the instance
            await complete("kim")
            async with real_begin() as conn:
                yield conn

        monkeypatch.setattr(h.store, "begin", terminate_race)
        (kim,) = await h.instances("kim")
        with pytest.raises(FlowError, match="ended meanwhile"):
            await svc.k.actions["instance.terminate"]({"instance": kim.id})
        monkeypatch.undo()
    statuses = {i.user_id: i.status for i in await h.instances()}
    assert statuses == {"jo": "completed", "kim": "completed"}


async def test_a_round_whose_commit_is_reported_failed_still_finds_the_racing_event(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The round that begins the wait commits, but the reply is lost (MySQL 2013); the
    event that raced the step is still found in the store and wakes the wait."""
    app = make_app("cart", awaiting)
    await h.user("eve")
    real = steps_module.max_event_id
    raced: list[int] = []

    async def racing_read(conn: Any) -> int:
        if raced:
            return await real(conn)
        async with h.store.connect() as other:
            mark = await real(other)
        batch = await h.committed_event("eve", "purchase", amount=9)
        raced.append(batch.events[0].id)
        assert h.svc is not None
        h.svc.ingested(batch)  # matched before the wait is visible: nothing waits yet
        return mark

    monkeypatch.setattr(steps_module, "max_event_id", racing_read)
    armed = lose_the_commit_reply(h, monkeypatch, "wait_for_event")
    async with h.running(app):
        await h.join("eve", "seg")
        await h.advance(3 * DAY)
    assert armed == [1, 2]
    assert await h.sent("eve") == [("thanks", 0)]


async def test_m0003_runs_again_after_a_kill_between_its_alter_and_the_stamp(
        store: Store) -> None:
    """MariaDB commits an ALTER at once: the step must not fail on the column it added."""
    async with store.begin() as conn:
        await conn.execute(sa.update(schema_version).values(version=2))  # column present
    assert await store.migrate() == 2
    assert await store.read_schema_version() == SCHEMA_VERSION


async def test_entries_committed_but_never_handed_over_all_start_after_a_crash(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 3: the catch-up reads every change after the durable cursor, not only the
    newest window (shrunk here to 20 so 50 changes span three reads)."""
    monkeypatch.setattr(entries_module, "CATCH_UP_CHANGES", 20)
    monkeypatch.setattr(flows_work, "CATCH_UP_CHANGES", 20)
    app = make_app("onboarding", onboarding)
    uids = [f"u{i:02}" for i in range(50)]
    for uid in uids:
        await h.user(uid)
    async with h.running(app):  # saves the changes cursor at start
        pass
    now = h.clock.now()
    async with h.store.begin() as conn:  # a refresh committed; the process died before
        await conn.execute(sa.insert(segment_members), [     # it told flows
            {"segment": "seg", "user_id": u, "entered_at": now, "evaluated_at": now}
            for u in uids])
        await conn.execute(sa.insert(segment_changes), [
            {"segment": "seg", "user_id": u, "entered": True, "at": now} for u in uids])
    async with h.running(app):
        pass
    started = {i.user_id for i in await h.instances()}
    assert started == set(uids)
    async with h.store.connect() as conn:
        cursor = await load_cursor(conn, CHANGES_CURSOR)
    assert cursor is not None
    assert cursor.last_event_id >= 50


class _Sink:
    def __init__(self) -> None:
        self.through: list[int] = []

    async def membership_changed(self, changes: Any) -> None:
        return None

    def changes_through(self, change_id: int) -> None:
        self.through.append(change_id)


def test_the_engine_never_tells_a_cursor_past_a_writer_still_in_flight() -> None:
    """Writers of segment_changes commit in any order; the id a durable sink may pass is
    below every writer still between its first write and its hand-off."""
    out = MembershipOutputs()
    sink = _Sink()
    out.sinks, out._ch_seen, out._ch_inflight = [sink], 100, collections.Counter()
    slow = out._changes_opening()  # a refresh: its ids will be above 100
    fast = out._changes_opening()
    out._changes_closed(fast, 180)  # committed first with higher ids
    assert sink.through == [100]
    nxt = out._changes_opening()  # floor 180 now
    out._changes_closed(slow, 150)
    assert sink.through[-1] == 180  # the slow one is done; the next floor holds
    out._changes_closed(nxt, 0)  # rolled back: wrote nothing
    assert sink.through[-1] == 180
    assert not out._ch_inflight


async def test_a_crash_between_resume_and_its_match_still_wakes_the_paused_wait(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A paused campaign's dropped wake holds the cursor until the resume has matched
    again, so a crash right after resume's commit leaves the event for the next start."""
    app = make_app("cart", awaiting)
    await h.user("lea")
    async with h.running(app) as svc:
        await h.join("lea", "seg")
        await svc.k.actions["campaign.pause"]({"campaign": "cart"})
        await h.advance(0.5 * DAY)
        await h.event("lea", "purchase", amount=11)

        async def killed(campaign: str) -> int:
            raise anyio.get_cancelled_exc_class()  # the process dies here

        monkeypatch.setattr(svc, "_match_campaign", killed)
        with contextlib.suppress(anyio.get_cancelled_exc_class()):
            await svc.k.actions["campaign.resume"]({"campaign": "cart"})
        await svc._save_cursor()  # the saver ran before the kill
        monkeypatch.undo()
    async with h.running(app):
        await h.advance(3 * DAY)
    assert await h.sent("lea") == [("thanks", 0.5)]


def hourly(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("a")
    yield rt.wait(hours=1)
    yield rt.send_email("b")


async def test_a_wait_begun_after_the_clock_stepped_back_fires_at_its_time(
        h: Harness) -> None:
    """Finding 5: the wheel never moved back, so a wait due before its tick fired at
    once, was found early and dropped. Now the wheel is rebuilt at the new time."""
    app = make_app("hourly", hourly)
    await h.user("old")
    await h.user("new")
    async with h.running(app) as svc:
        await h.join("old", "seg")
        await h.advance(3 * 3600)  # old: a, then b an hour later
        h.clock.set(h.clock.now() - dt.timedelta(hours=2))  # NTP steps the clock back
        await h.join("new", "seg")  # its wait is due before the wheel's old tick
        await h.advance(30 * 60)
        assert [t for t, _ in await h.sent("new")] == ["a"]  # not early
        await h.advance(45 * 60)
        assert svc.wheel_statistics().near + svc.wheel_statistics().far == 0
    assert [t for t, _ in await h.sent("new")] == ["a", "b"]
    (inst,) = await h.instances("new")
    assert inst.status == "completed"


async def test_a_clock_step_forward_fires_every_wait_it_passes_once(h: Harness) -> None:
    app = make_app("hourly", hourly)
    for uid in ("f1", "f2"):
        await h.user(uid)
    async with h.running(app):
        await h.join("f1", "seg")
        await h.join("f2", "seg")
        h.clock.set(h.clock.now() + dt.timedelta(hours=5))  # NTP steps the clock forward
        await h.advance(1)
    for uid in ("f1", "f2"):
        assert [t for t, _ in await h.sent(uid)] == ["a", "b"]


async def test_an_engine_error_in_a_batch_steps_each_instance_alone(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: an error other than an outage took every wake of the batch with
    it (released unstepped: the waits later timed out). Now each is tried alone."""
    app = make_app("cart", awaiting)
    for uid in ("m1", "m2"):
        await h.user(uid)
    real = steps_module.load_journals
    calls = 0

    async def flaky(*a: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("a journal row it cannot read")
        return await real(*a, **kw)

    async with h.running(app) as svc:
        for uid in ("m1", "m2"):
            await h.join(uid, "seg")
        monkeypatch.setattr(steps_module, "load_journals", flaky)
        b1 = await h.committed_event("m1", "purchase", amount=1)
        b2 = await h.committed_event("m2", "purchase", amount=2)
        svc.ingested(IngestBatch(users=frozenset({"m1", "m2"}),
                                 events=(*b1.events, *b2.events)))
        await h.advance(3 * DAY)
    assert calls >= 3  # the batch, then each alone
    for uid in ("m1", "m2"):
        assert await h.sent(uid) == [("thanks", 0)]


async def test_a_matching_error_is_retried_not_left_until_the_next_event(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: a non-outage error while matching left the batch queued with
    nothing to retry it, stalling every wake after it."""
    app = make_app("cart", awaiting)
    await h.user("n1")
    async with h.running(app) as svc:
        await h.join("n1", "seg")
        failed: list[int] = []
        real_match = type(svc)._match_events

        async def flaky(self: Any) -> None:
            if not failed:
                failed.append(1)
                raise ValueError("query interrupted")
            await real_match(self)

        monkeypatch.setattr(type(svc), "_match_events", flaky)
        await h.event("n1", "purchase", amount=5)
        await h.advance(60)  # the resync delay
    assert failed == [1]
    assert await h.sent("n1") == [("thanks", 0)]


async def test_a_wait_whose_commit_was_reported_failed_still_fires_on_time(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 4: the wait committed but the step heard 'lost connection', so it never
    reached the wheel; the resync after the failure now rebuilds the near wheel."""
    app = make_app("hourly", hourly)
    await h.user("ola")
    armed = lose_the_commit_reply(h, monkeypatch, "wait")
    async with h.running(app):
        await h.join("ola", "seg")
        await h.advance(5)  # the resync after the failure (RESYNC_RETRY)
        await h.advance(2 * 3600)
    assert armed == [1, 2]
    assert [(t, round(d * 24, 1)) for t, d in await h.sent("ola")] == [("a", 0), ("b", 1.0)]


def ticking(ctx: Any, rt: Any) -> Generator[object, object, object]:
    n = int(ctx.data.get("n", 0))
    for _ in range(3):
        yield rt.send_email("tick", n=n)
        yield rt.wait(days=1)
        n += 1
    if n < 9:
        yield rt.continue_as_new(n=n)


async def test_continue_as_new_keeps_a_looping_flows_journal_short(h: Harness) -> None:
    """#23.16: a flow that loops starts over as a new instance with its state as
    ctx.data, so no journal grows past one lap; it survives a restart mid-lap."""
    app = make_app("ticker", ticking)
    await h.user("pat")
    async with h.running(app):
        await h.join("pat", "seg")
        await h.advance(4.5 * DAY)
    async with h.running(app):  # a restart: the current lap replays its short journal
        await h.advance(6 * DAY)
    insts = await h.instances("pat")
    assert [i.status for i in insts] == ["completed", "completed", "completed"]
    assert [dict(i.start_data or {}) for i in insts] == [{}, {"n": 3}, {"n": 6}]
    async with h.store.connect() as conn:
        data = [r[0] for r in await conn.execute(
            sa.select(messages.c.data).order_by(messages.c.id))]
        longest = (await conn.execute(sa.select(sa.func.count()).select_from(flow_journal)
                                      .group_by(flow_journal.c.instance_id)
                                      .order_by(sa.func.count().desc()).limit(1))).scalar()
    assert [d["n"] for d in data] == list(range(9))  # each once, none lost at the restart
    assert longest == 7  # one lap: 3 sends, 3 waits, and continue_as_new


def test_continue_as_new_state_must_be_json() -> None:
    from segflowd.errors import FlowError
    from segflowd.flows.runtime import Runtime

    with pytest.raises(FlowError, match="JSON"):
        Runtime(lambda _n: False).continue_as_new(when=object())


@pytest.mark.parametrize("outage", [False, True])
async def test_a_paused_wake_dropped_twice_is_released_once_at_resume(
        h: Harness, monkeypatch: pytest.MonkeyPatch, outage: bool) -> None:
    """Review round 2: a paused campaign's wake dropped twice (its batch met an outage
    and the resync pushed it again) was released twice at resume, so the cursor passed
    the event before the resume's own wake was stepped; a kill then lost it."""
    app = make_app("cart", awaiting)
    await h.user("lea")
    async with h.running(app) as svc:
        await h.join("lea", "seg")
        await svc.k.actions["campaign.pause"]({"campaign": "cart"})
        await h.advance(0.5 * DAY)
        real_batch = svc._stepper.run_batch
        downs: list[int] = [] if outage else [0]

        async def flaky(works: Any) -> None:
            await real_batch(works)  # A prepared: paused -> held
            if not downs and any(w.kind == "event" for w in works):
                downs.append(1)  # the rest of the batch met an outage
                raise StoreUnavailable("store unavailable: lost connection")

        monkeypatch.setattr(svc._stepper, "run_batch", flaky)
        await h.event("lea", "purchase", amount=11)
        await h.advance(5)  # resync re-pushes the held wake
        assert downs == ([1] if outage else [0])
        real_match = svc._match_campaign
        queued: list[Any] = []

        async def killed(campaign: str) -> int:
            monkeypatch.setattr(svc, "_push", queued.append)  # worker never gets it
            await real_match(campaign)
            svc._release_paused(campaign)  # what resume does next
            await svc._save_cursor()  # the saver ran
            raise anyio.get_cancelled_exc_class()  # kill -9

        monkeypatch.setattr(svc, "_match_campaign", killed)
        with contextlib.suppress(anyio.get_cancelled_exc_class()):
            await svc.k.actions["campaign.resume"]({"campaign": "cart"})
        monkeypatch.undo()
    async with h.running(app):
        await h.advance(3 * DAY)
    assert await h.sent("lea") == [("thanks", 0.5)]


async def test_a_refresh_whose_hand_off_breaks_after_commit_keeps_its_floor(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review round 2: the refresh committed, then reading its changes back failed (a
    pool timeout); it closed its floor as if nothing was written, and a later writer let
    the changes cursor pass entries flows never heard of."""
    app = make_app("onboarding", onboarding)
    app.segment("other", sql="SELECT id FROM users WHERE id = 'zz'")
    for u in ("u1", "u2", "u3"):
        await h.user(u)
    async with h.running(app) as svc:
        seg = SegmentService(svc.k, membership_sinks=[svc])
        await seg.start()
        real_diff = refresh_module.refresh_diff
        real_connect = h.store.connect
        armed: list[int] = []

        async def diff(*a: Any, **kw: Any) -> Any:
            out = await real_diff(*a, **kw)
            if a[1].name == "seg":
                armed.append(1)
            return out

        @contextlib.asynccontextmanager
        async def connect() -> Any:
            if armed == [1]:
                armed.append(2)
                raise PoolTimeout("QueuePool limit of size 5 overflow 10 reached")
            async with real_connect() as c:
                yield c

        monkeypatch.setattr(refresh_module, "refresh_diff", diff)
        monkeypatch.setattr(h.store, "connect", connect)
        with contextlib.suppress(Exception):
            await seg.refresh("seg")  # committed; hand-off failed; closed with top=0
        monkeypatch.undo()
        await h.user("zz")
        await seg.refresh("other")  # a later writer moves the through-id past
        await svc._save_changes_cursor()
    async with h.running(app):  # restart: catch up from the durable cursor
        await h.settle()
    started = {i.user_id for i in await h.instances()}
    assert {"u1", "u2", "u3"} <= started, started


async def test_a_dynamic_exit_racing_continue_as_new_ends_the_successor(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review round 2: the instance continued as new between exit_user's read and its
    update; the exit read again and ended the successor, not nothing."""
    if h.store.dialect == "sqlite":
        pytest.skip("SQLite serialises writers: no read-then-update window")
    app = make_app("ticker", ticking, behavior="dynamic")
    await h.user("quin")
    async with h.running(app) as svc:
        await h.join("quin", "seg")
        (old,) = await h.instances("quin")
        real_begin = h.store.begin
        raced: list[int] = []

        class Racing:
            def __init__(self, conn: Any) -> None:
                self.conn = conn

            async def execute(self, stmt: Any, *a: Any, **kw: Any) -> Any:
                res = await self.conn.execute(stmt, *a, **kw)
                if isinstance(stmt, sa.Select) and not raced:
                    raced.append(1)  # the step commits continue_as_new now
                    now = h.clock.now()
                    async with real_begin() as other:
                        await other.execute(sa.update(flow_instances).where(
                            flow_instances.c.id == old.id).values(
                            status="completed", live=None, wake_at=None, ended_at=now))
                        await other.execute(sa.insert(flow_instances).values(
                            campaign="ticker", user_id="quin", version=old.version,
                            status="waiting", live=1, seq=0, start_data={"n": 3},
                            created_at=now, updated_at=now))
                return res

        @contextlib.asynccontextmanager
        async def racing_begin() -> Any:
            async with real_begin() as conn:
                yield Racing(conn)

        monkeypatch.setattr(h.store, "begin", racing_begin)
        exited = await svc.exit_user("ticker", "quin")
        monkeypatch.undo()
    assert raced == [1]
    statuses = [(i.id, i.status) for i in await h.instances("quin")]
    assert statuses == [(old.id, "completed"), (exited, "exited")]


async def test_changes_held_while_a_resync_lifts_the_freeze_freeze_it_again(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review round 2: a delivery that started while changes were held (cursor frozen)
    held its own after a resync had applied the old ones and lifted the freeze; the
    freeze must come back, below this delivery's changes."""
    app = make_app("onboarding", onboarding)
    await h.user("rae")
    async with h.running(app) as svc:
        now = h.clock.now()
        old = MembershipChange("seg", "rae", True, now)
        svc._held, svc._ch_frozen, svc._ch_through = [old], 5, 7  # an earlier outage

        async def apply(changes: Any) -> None:
            svc._held = []  # the resync applied the old changes meanwhile ...
            svc.changes_applied()
            svc._held.extend(changes)  # ... and these meet the outage now

        monkeypatch.setattr(svc, "_apply_membership", apply)
        await svc.membership_changed([MembershipChange("seg", "rae", False, now)])
        monkeypatch.undo()
        assert svc._ch_frozen == 7  # below this delivery, not lifted
        svc._held = []  # (leave the service clean for the block's exit)


async def spin(rounds: int = 200) -> None:
    """Let every task run (settle() would wait out a retry that sleeps on the clock)."""
    for _ in range(rounds):
        await anyio.lowlevel.checkpoint()


async def test_a_store_failure_while_rewinding_the_wheel_is_retried(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review round 3: the rebuild after a backward step failed on the store and left an
    empty wheel with no bounds, which never loaded a wait again."""
    app = make_app("hourly", hourly)
    await h.user("uma")
    async with h.running(app) as svc:
        await h.join("uma", "seg")
        real = type(svc)._count_far
        failed: list[int] = []

        async def flaky(self: Any) -> None:
            if not failed:
                failed.append(1)
                raise StoreUnavailable("store unavailable: a blip")
            await real(self)

        monkeypatch.setattr(type(svc), "_count_far", flaky)
        h.clock.set(h.clock.now() - dt.timedelta(seconds=10))
        svc._kick.set()
        await spin()  # the ticker finds the clock behind the wheel: the rebuild fails
        assert failed == [1]
        for _ in range(6 * 24):  # a day in ten-minute steps (the retry sleeps on the clock)
            await h.clock.advance(600)
            await spin()
    assert [t for t, _ in await h.sent("uma")] == ["a", "b"]
