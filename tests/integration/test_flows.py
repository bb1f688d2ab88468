"""Durable flows end to end on SQLite and MariaDB, with an injected clock.

FlowService is driven directly: the tests write ``segment_members`` and hand it the
membership changes the segment engine would, and advance a FakeClock through the waits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from segflowd.app import Segflow, TemplateDef
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.errors import StoreUnavailable
from segflowd.flows import work as flows_work
from segflowd.flows.service import FlowService
from segflowd.flows.versions import preview_lines, reconcile_versions
from segflowd.hooks import ConditionRunner, IngestBatch, MembershipChange, StoredEvent
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import events, flow_instances, flow_journal, messages, segment_members, users
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 3, 1, 9, 0, 0)
DAY = 86400.0
Flow = Callable[..., Generator[object, object, object]]


class Harness:
    def __init__(self, store: Store, tmp_path: Path) -> None:
        cfg = tmp_path / "segflow.toml"
        cfg.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                       '[providers.outbox]\nplugin = "outbox"\n')
        self.config = load_config(cfg, environ={})
        self.store = store
        self.clock = FakeClock(NOW)
        self.bus = Bus()
        self.svc: FlowService | None = None

    def kernel(self, app: Segflow) -> Kernel:
        return Kernel(config=self.config, app=app, store=self.store, clock=self.clock,
                      bus=self.bus, metrics=Metrics())

    @contextlib.asynccontextmanager
    async def running(self, app: Segflow, *, conditions: ConditionRunner | None = None
                      ) -> AsyncIterator[FlowService]:
        """A FlowService on this store; leaving the block stops it (like a daemon exit)."""
        svc = FlowService(self.kernel(app), workers=2, conditions=conditions)
        self.svc = svc
        async with anyio.create_task_group() as tg:
            await tg.start(svc.run)
            await self.settle()
            yield svc
            await self.settle()
            tg.cancel_scope.cancel()

    async def settle(self) -> None:
        assert self.svc is not None
        for _ in range(3):
            for _ in range(30):
                await anyio.lowlevel.checkpoint()
            await self.svc.settle()

    async def advance(self, seconds: float) -> None:
        """Move the clock, stopping at each moment the service has something due."""
        assert self.svc is not None
        end = self.clock.now() + dt.timedelta(seconds=seconds)
        for _ in range(10_000):
            await self.settle()
            nd = self.svc.next_due()
            now = self.clock.now()
            if nd is None or nd >= end:
                await self.clock.advance((end - now).total_seconds())
                await self.settle()
                return
            await self.clock.advance(max(0.0, (nd - now).total_seconds()) + 0.2)
        raise AssertionError("the service kept finding work")  # pragma: no cover

    async def user(self, uid: str, **attrs: object) -> None:
        now = self.clock.now()
        async with self.store.begin() as conn:
            found = (await conn.execute(sa.select(users.c.id).where(users.c.id == uid))).first()
            if found is None:
                await conn.execute(sa.insert(users).values(
                    id=uid, email=f"{uid}@example.com", attributes=attrs, created_at=now,
                    updated_at=now))
            else:
                await conn.execute(sa.update(users).where(users.c.id == uid).values(
                    attributes=attrs, updated_at=now))

    async def join(self, uid: str, segment: str) -> None:
        now = self.clock.now()
        async with self.store.begin() as conn:
            await conn.execute(sa.insert(segment_members).values(
                segment=segment, user_id=uid, entered_at=now, evaluated_at=now))
        assert self.svc is not None
        await self.svc.membership_changed([MembershipChange(segment, uid, True, now)])
        await self.settle()

    async def leave(self, uid: str, segment: str) -> None:
        now = self.clock.now()
        async with self.store.begin() as conn:
            await conn.execute(sa.delete(segment_members).where(
                segment_members.c.segment == segment, segment_members.c.user_id == uid))
        assert self.svc is not None
        await self.svc.membership_changed([MembershipChange(segment, uid, False, now)])
        await self.settle()

    async def committed_event(self, uid: str, name: str, **attrs: object) -> IngestBatch:
        """Commit an event and return the batch ingest would hand the flows."""
        now = self.clock.now()
        async with self.store.begin() as conn:
            res = await conn.execute(sa.insert(events).values(
                user_id=uid, name=name, attributes=attrs, created_at=now, received_at=now))
            eid = int(res.inserted_primary_key[0])  # type: ignore[index]
        return IngestBatch(users=frozenset({uid}), events=(
            StoredEvent(eid, uid, None, name, attrs, now, now),))

    async def event(self, uid: str, name: str, **attrs: object) -> None:
        batch = await self.committed_event(uid, name, **attrs)
        assert self.svc is not None
        self.svc.ingested(batch)
        await self.settle()

    async def sent(self, uid: str | None = None) -> list[tuple[str, float]]:
        """(template, days since NOW) of the user's queued messages, in order."""
        q = sa.select(messages.c.template, messages.c.created_at).order_by(messages.c.id)
        if uid is not None:
            q = q.where(messages.c.user_id == uid)
        async with self.store.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [(t, round((c - NOW).total_seconds() / DAY, 2)) for t, c in rows]

    async def instances(self, uid: str | None = None) -> list[Any]:
        q = sa.select(flow_instances).order_by(flow_instances.c.id)
        if uid is not None:
            q = q.where(flow_instances.c.user_id == uid)
        async with self.store.connect() as conn:
            return list(await conn.execute(q))


@pytest.fixture
def h(store: Store, tmp_path: Path) -> Harness:
    return Harness(store, tmp_path)


class AnyTemplate(dict[str, TemplateDef]):
    """These tests are about flows: every template name they send counts as defined."""

    def __contains__(self, name: object) -> bool:
        return True


def make_app(name: str, flow: Flow, *, behavior: str = "static", reentry: bool = False,
             segments: tuple[str, ...] = ("seg",), exclude: tuple[str, ...] = ()) -> Segflow:
    app = Segflow()
    app.templates = AnyTemplate()
    for s in (*segments, *exclude):
        app.segment(s, sql="SELECT id FROM users")
    app.campaign(name, segments=list(segments), exclude=list(exclude),
                 behavior=behavior, reentry=reentry)(flow)  # type: ignore[arg-type]
    return app


# -- the README's flows --------------------------------------------------------------------

def onboarding(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("welcome")
    yield rt.wait(days=1)
    if not ctx.user.get("profile_completed"):
        yield rt.send_email("complete-profile-reminder")
        yield rt.wait(days=3)
    yield rt.send_email("feature-highlights")


def winback(ctx: Any, rt: Any) -> Generator[object, object, object]:
    for i in range(4):
        yield rt.send_email("winback", attempt=i)
        yield rt.wait(days=2 ** i)  # 1, 2, 4, 8 days


async def test_onboarding_runs_both_branches_over_days_with_the_injected_clock(
        h: Harness) -> None:
    app = make_app("onboarding", onboarding, segments=("new-users",))
    await h.user("ann")
    await h.user("bob", profile_completed=True)
    async with h.running(app):
        await h.join("ann", "new-users")
        await h.join("bob", "new-users")
        await h.advance(10 * DAY)
    assert await h.sent("ann") == [("welcome", 0), ("complete-profile-reminder", 1),
                                   ("feature-highlights", 4)]
    assert await h.sent("bob") == [("welcome", 0), ("feature-highlights", 1)]
    assert [(i.status, i.live) for i in await h.instances()] == [("completed", None)] * 2


async def test_winback_sends_with_doubling_waits_then_completes(h: Harness) -> None:
    app = make_app("winback", winback, behavior="dynamic", segments=("inactive-users",))
    await h.user("cy")
    async with h.running(app):
        await h.join("cy", "inactive-users")
        await h.advance(30 * DAY)
    assert await h.sent("cy") == [("winback", 0), ("winback", 1), ("winback", 3),
                                  ("winback", 7)]
    [inst] = await h.instances("cy")
    assert inst.status == "completed"
    # 1 + 2 + 4 + 8 days; the test clock stops a fraction of a second after each wake
    assert abs((inst.ended_at - NOW).total_seconds() - 15 * DAY) < 5


async def test_a_restart_mid_wait_replays_and_sends_nothing_twice(h: Harness) -> None:
    app = make_app("onboarding", onboarding, segments=("new-users",))
    await h.user("ann")
    async with h.running(app):
        await h.join("ann", "new-users")
        await h.advance(0.5 * DAY)
    assert await h.sent("ann") == [("welcome", 0)]
    for _ in range(2):  # two restarts, each replaying the journal from the store
        async with h.running(app):
            await h.advance(1 * DAY)
    async with h.running(app):
        await h.advance(5 * DAY)
    assert await h.sent("ann") == [("welcome", 0), ("complete-profile-reminder", 1),
                                   ("feature-highlights", 4)]
    async with h.store.connect() as conn:
        keys = [r[0] for r in await conn.execute(sa.select(messages.c.dedupe_key))]
    assert len(keys) == len(set(keys)) == 3


def branchy(ctx: Any, rt: Any) -> Generator[object, object, object]:
    vip = ctx.user.get("vip")
    yield rt.wait(days=1)
    yield rt.send_email("vip" if vip else "regular", vip_now=ctx.user.get("vip"))


async def test_replay_takes_the_journaled_branch_after_the_users_data_changed(
        h: Harness) -> None:
    app = make_app("branchy", branchy)
    await h.user("dee", vip=False)
    async with h.running(app):
        await h.join("dee", "seg")
    await h.user("dee", vip=True)  # changed while the flow waits
    async with h.running(app):  # a fresh service: the generator is rebuilt from the journal
        await h.advance(2 * DAY)
    assert await h.sent("dee") == [("regular", 1)]  # the path taken before the change
    async with h.store.connect() as conn:
        data = (await conn.execute(sa.select(messages.c.data))).scalar_one()
    assert data == {"vip_now": True}  # reads after the journal are live


def v1(ctx: Any, rt: Any) -> Generator[object, object, object]:
    if ctx.user.get("vip"):
        yield rt.send_email("vip-welcome")
    yield rt.wait(days=1)
    yield rt.send_email("after")


def v2(ctx: Any, rt: Any) -> Generator[object, object, object]:
    if ctx.user.get("vip"):
        yield rt.send_email("vip-welcome-2")
    yield rt.wait(days=1)
    yield rt.send_email("after-2")


async def test_changed_flow_clean_replays_move_diverging_ones_are_marked_and_previewed(
        h: Harness) -> None:
    old, new = make_app("promo", v1), make_app("promo", v2)
    assert old.campaigns["promo"].version != new.campaigns["promo"].version
    for uid, vip in (("u1", False), ("u2", False), ("u3", True)):
        await h.user(uid, vip=vip)
    async with h.running(old):
        for uid in ("u1", "u2", "u3"):
            await h.join(uid, "seg")

    # the deploy preview: nothing written
    [report] = await reconcile_versions(h.store, new, h.clock.now(), apply=False)
    assert (report.in_flight, report.moved, report.diverged) == (3, 2, 1)
    [(reason, count)] = report.reasons
    assert count == 1
    assert "send_email('vip-welcome-2')" in reason
    assert "vip-welcome" in reason
    lines = preview_lines([report])
    assert "3 in flight, 2 would move, 1 would diverge" in lines[0]
    assert {i.version for i in await h.instances()} == {old.campaigns["promo"].version}

    diverged = h.bus.subscribe(kinds=frozenset({"flow.diverged"}))
    async with h.running(new) as svc:
        await h.advance(2 * DAY)
        assert svc.statistics().diverged == 1
    assert [e.data["instance"] for e in diverged.drain()[0]] == [
        (await h.instances("u3"))[0].id]
    assert await h.sent("u1") == [("after-2", 1)]
    assert await h.sent("u2") == [("after-2", 1)]
    assert await h.sent("u3") == [("vip-welcome", 0)]  # no further effects
    [u3] = await h.instances("u3")
    assert (u3.status, u3.live, u3.wake_at) == ("diverged", 1, None)
    assert "vip-welcome-2" in u3.error
    assert {i.version for i in await h.instances("u1")} == {new.campaigns["promo"].version}

    async with h.running(new) as svc:  # an operator restarts it on the new version
        out = await svc.k.actions["instance.restart"]({"instance": u3.id})
        await h.settle()
        assert out == {"instance": u3.id + 1, "restarted_from": u3.id}
        await h.advance(2 * DAY)
    assert await h.sent("u3") == [("vip-welcome", 0), ("vip-welcome-2", 2), ("after-2", 3)]
    assert [i.status for i in await h.instances("u3")] == ["terminated", "completed"]


async def test_dynamic_exit_cancels_the_pending_wait_and_a_new_match_starts_over(
        h: Harness) -> None:
    app = make_app("winback", winback, behavior="dynamic", segments=("inactive-users",))
    await h.user("cy")
    exited = h.bus.subscribe(kinds=frozenset({"flow.exited"}))
    async with h.running(app) as svc:
        await h.join("cy", "inactive-users")
        await h.advance(1.5 * DAY)
        [inst] = await h.instances("cy")
        assert inst.status == "waiting"
        assert inst.wake_at is not None
        await h.leave("cy", "inactive-users")
        assert inst.id not in svc.wheel
        [inst] = await h.instances("cy")
        assert (inst.status, inst.live, inst.wake_at) == ("exited", None, None)
        await h.advance(10 * DAY)
        assert await h.sent("cy") == [("winback", 0), ("winback", 1)]
        await h.join("cy", "inactive-users")  # matches again: starts over
    assert await h.sent("cy") == [("winback", 0), ("winback", 1), ("winback", 11.5)]
    assert len(exited.drain()[0]) == 1
    assert [i.status for i in await h.instances("cy")] == ["exited", "waiting"]


async def test_an_excluded_segment_ends_a_dynamic_flow(h: Harness) -> None:
    app = make_app("winback", winback, behavior="dynamic", segments=("inactive",),
                   exclude=("churned",))
    await h.user("ed")
    async with h.running(app):
        await h.join("ed", "inactive")
        await h.join("ed", "churned")
    assert [i.status for i in await h.instances("ed")] == ["exited"]


def awaiting(ctx: Any, rt: Any) -> Generator[object, object, object]:
    ev = yield rt.wait_for_event("purchase", timeout=dt.timedelta(days=2))
    if ev is None:
        yield rt.send_email("nudge")
    else:
        yield rt.send_email("thanks", amount=ev.attributes["amount"])


async def test_wait_for_event_wakes_on_the_event_once(h: Harness) -> None:
    app = make_app("cart", awaiting)
    await h.user("fay")
    async with h.running(app):
        await h.join("fay", "seg")
        await h.advance(0.5 * DAY)
        await h.event("fay", "login")  # not the awaited event
        await h.event("fay", "purchase", amount=30)
        await h.event("fay", "purchase", amount=40)  # the flow no longer waits
        await h.advance(5 * DAY)  # nor does its timeout fire
    assert await h.sent("fay") == [("thanks", 0.5)]
    async with h.store.connect() as conn:
        data = (await conn.execute(sa.select(messages.c.data))).scalar_one()
    assert data == {"amount": 30}


async def test_wait_for_event_times_out_once_and_ignores_later_events(h: Harness) -> None:
    app = make_app("cart", awaiting)
    await h.user("gus")
    async with h.running(app):
        await h.join("gus", "seg")
        await h.advance(3 * DAY)
        await h.event("gus", "purchase", amount=5)
    assert await h.sent("gus") == [("nudge", 2)]
    async with h.store.connect() as conn:
        results = [r[0] for r in await conn.execute(
            sa.select(flow_journal.c.result).order_by(flow_journal.c.seq))]
    assert results[0] == {"value": None}  # the timeout is the journaled result


async def test_one_live_instance_per_campaign_and_user_under_concurrent_entries(
        h: Harness) -> None:
    app = make_app("winback", winback, behavior="dynamic", reentry=True)
    await h.user("hal")
    async with h.running(app) as svc, h.running(app) as other:
        c = app.campaigns["winback"]
        got: list[int | None] = []

        async def enter(s: FlowService) -> None:
            got.append(await s.enter(c, "hal"))

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(enter, svc if i % 2 else other)
        await h.settle()
    assert len([g for g in got if g is not None]) == 1
    assert [i.live for i in await h.instances("hal")] == [1]
    now = h.clock.now()
    with pytest.raises(IntegrityError):  # the store itself refuses a second live row
        async with h.store.begin() as conn:
            await conn.execute(sa.insert(flow_instances).values(
                campaign="winback", user_id="hal", version="x", status="running", live=1,
                seq=0, created_at=now, updated_at=now))


def crashing(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("hello")
    yield rt.wait(hours=1)
    _ = 1 / 0
    yield rt.send_email("never")


def runaway(ctx: Any, rt: Any) -> Generator[object, object, object]:
    while True:
        yield rt.opened("hello")


async def test_a_crashing_flow_fails_its_instance_not_the_service(h: Harness) -> None:
    app = make_app("crash", crashing)
    app.campaign("fine", segments=["seg"])(onboarding)
    await h.user("ian")
    failed = h.bus.subscribe(kinds=frozenset({"flow.failed"}))
    async with h.running(app) as svc:
        await h.join("ian", "seg")
        await h.advance(5 * DAY)
        assert svc.statistics().failures == 1
    crash, fine = await h.instances("ian")
    assert (crash.status, crash.live) == ("failed", None)
    assert "ZeroDivisionError" in crash.error
    assert "Traceback" in crash.error
    assert fine.status == "completed"
    [ev] = failed.drain()[0]
    assert ev.data["instance"] == crash.id
    assert "ZeroDivisionError" in str(ev.data["error"])
    assert ("never", 0.04) not in await h.sent("ian")


async def test_a_runaway_flow_is_failed_after_the_command_limit(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flows_work, "MAX_COMMANDS_WITHOUT_WAIT", 25)
    app = make_app("loop", runaway)
    await h.user("jo")
    async with h.running(app):
        await h.join("jo", "seg")
    [inst] = await h.instances("jo")
    assert inst.status == "failed"
    assert "runaway" in inst.error
    assert inst.seq == 25


def conditional(ctx: Any, rt: Any) -> Generator[object, object, object]:
    ok = yield rt.condition("crm", "SELECT 1 AS result")
    yield rt.send_email("yes" if ok else "no")


async def test_a_condition_without_data_sources_fails_naming_the_source(h: Harness) -> None:
    app = make_app("cond", conditional)
    await h.user("kim")
    async with h.running(app):
        await h.join("kim", "seg")
    [inst] = await h.instances("kim")
    assert inst.status == "failed"
    assert "'crm'" in inst.error
    assert "Traceback" not in inst.error


class Conditions:
    """A ConditionRunner that answers from a table and records what it was asked."""

    def __init__(self, premium: set[str]) -> None:
        self.premium = premium
        self.asked: list[tuple[str, str, dict[str, object]]] = []

    async def condition(self, source: str, sql: str, params: Mapping[str, object]) -> bool:
        self.asked.append((source, sql, dict(params)))
        return params.get("profile_id") in self.premium


def premium_check(ctx: Any, rt: Any) -> Generator[object, object, object]:
    ok = yield rt.condition("crm", "SELECT true AS result WHERE '<%= profile_id %>' = 'x'")
    yield rt.wait(days=1)
    yield rt.send_email("premium" if ok else "basic")


async def test_a_condition_binds_the_flows_user_and_is_not_asked_again_on_replay(
        h: Harness) -> None:
    app = make_app("cond", premium_check)
    await h.user("ana")
    await h.user("ben")
    first = Conditions(premium={"ana"})
    async with h.running(app, conditions=first):
        await h.join("ana", "seg")
        await h.join("ben", "seg")
    assert sorted((src, p["profile_id"]) for src, _sql, p in first.asked) == [
        ("crm", "ana"), ("crm", "ben")]
    # After a restart the flows replay past the condition from the journal: the source
    # is not asked again, and each user gets what the first answer decided.
    second = Conditions(premium={"ben"})  # the database changed its mind meanwhile
    async with h.running(app, conditions=second):
        await h.advance(2 * DAY)
    assert second.asked == []
    assert await h.sent("ana") == [("premium", 1.0)]
    assert await h.sent("ben") == [("basic", 1.0)]


async def test_a_paused_campaign_takes_no_entries_and_keeps_its_waits(h: Harness) -> None:
    from segflowd.schema import segment_changes

    app = make_app("onboarding", onboarding)
    await h.user("lu")
    await h.user("mo")
    async with h.running(app) as svc:
        await h.join("lu", "seg")
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        async with h.store.begin() as conn:  # recorded as the segment engine records it
            await conn.execute(sa.insert(segment_changes).values(
                segment="seg", user_id="mo", entered=True, at=h.clock.now()))
        await h.join("mo", "seg")
        await h.advance(2 * DAY)
        assert await h.sent("lu") == [("welcome", 0)]
        assert await h.instances("mo") == []
    async with h.running(app) as svc:  # paused survives a restart
        assert svc.statistics().paused == ("onboarding",)
        await h.advance(1 * DAY)
        assert await h.sent("lu") == [("welcome", 0)]
        await svc.k.actions["campaign.resume"]({"campaign": "onboarding"})
        await h.advance(5 * DAY)
    assert await h.sent("lu") == [("welcome", 0), ("complete-profile-reminder", 3),
                                  ("feature-highlights", 6)]
    # held while paused (on_pause="hold", the default): mo enters on resume
    assert await h.sent("mo") == [("welcome", 3), ("complete-profile-reminder", 4),
                                  ("feature-highlights", 7)]


async def test_segflowd_check_prints_the_deploy_preview_per_changed_campaign(
        h: Harness, tmp_path: Path) -> None:
    from segflowd.cli.check import run_check

    old, new = make_app("promo", v1), make_app("promo", v2)
    for uid, vip in (("u1", True), ("u2", False)):
        await h.user(uid, vip=vip)
    async with h.running(old):
        await h.join("u1", "seg")
        await h.join("u2", "seg")
    cfg = tmp_path / "check.toml"
    cfg.write_text(f'[daemon]\napp = "app.py:app"\n[store]\nurl = "{h.store.url}"\n'
                   '[email]\nprovider = "outbox"\n[providers.outbox]\nplugin = "outbox"\n'
                   f'path = "{tmp_path}/outbox"\n')
    lines: list[str] = []
    await run_check(load_config(cfg, environ={}), new, lines.append)
    preview = [line for line in lines if "promo" in line or line.startswith("  ")]
    assert preview[0].startswith("campaign 'promo' changed")
    assert "2 in flight, 1 would move, 1 would diverge" in preview[0]
    assert "yields send_email('vip-welcome-2')" in preview[1]
    assert preview[1].startswith("  1 x")
    assert {i.version for i in await h.instances()} == {old.campaigns["promo"].version}


async def test_a_step_that_loses_a_race_with_an_exit_writes_nothing_the_rest_commit(
        h: Harness) -> None:
    from segflowd.flows.work import Work

    app = make_app("winback", winback, behavior="dynamic")
    for uid in ("p1", "p2", "p3"):
        await h.user(uid)
    async with h.running(app) as svc:
        for uid in ("p1", "p2", "p3"):
            await h.join(uid, "seg")
        ids = [i.id for i in await h.instances()]
        for i in ids:  # take the timers away from the ticker: this test steps by hand
            svc.wheel.cancel(i)
        h.clock.set(h.clock.now() + dt.timedelta(days=1, seconds=1))
        runs = await svc._stepper._load([Work(i, "timer") for i in ids])
        assert len(runs) == 3
        await svc.exit_user("winback", "p2")  # after the batch was loaded and replayed
        await svc._stepper._round(runs)
        assert [r.lost for r in runs] == [False, True, False]
    assert await h.sent("p1") == [("winback", 0), ("winback", 1)]
    assert await h.sent("p2") == [("winback", 0)]
    assert await h.sent("p3") == [("winback", 0), ("winback", 1)]
    assert [i.status for i in await h.instances()] == ["running", "exited", "running"]


def waits_its_delay(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("hello")
    yield rt.wait(hours=float(ctx.user["delay"]))
    yield rt.send_email("bye")


@pytest.mark.parametrize("delays", [[1, 1, 1, 1, 2, 2, 2, 2], [1, 2, 3, 4, 5, 6, 7, 8]],
                         ids=["few-states", "a-state-each"])
async def test_one_round_moves_each_instance_to_its_own_state(
        h: Harness, delays: list[int]) -> None:
    """A round's updates are grouped by the state they set (or, with too many states, row
    by row); either way each instance gets its own wake time and seq."""
    from segflowd.flows.work import Work

    app = make_app("delays", waits_its_delay)
    uids = [f"d{i}" for i in range(len(delays))]
    for uid, d in zip(uids, delays, strict=True):
        await h.user(uid, delay=d)
    async with h.running(app) as svc:
        now = h.clock.now()
        async with h.store.begin() as conn:
            ids = [int((await conn.execute(sa.insert(flow_instances).values(
                campaign="delays", user_id=uid, version=app.campaigns["delays"].version,
                status="running", live=1, seq=0, created_at=now, updated_at=now))
                ).inserted_primary_key[0]) for uid in uids]  # type: ignore[index]
        await svc._stepper.run_batch([Work(i, "run") for i in ids])  # one batch: 2 rounds
        got = {i.user_id: i for i in await h.instances()}
        for uid, d in zip(uids, delays, strict=True):
            assert (got[uid].status, got[uid].seq) == ("waiting", 2)
            assert got[uid].wake_at == now + dt.timedelta(hours=d)
        await h.advance(9 * 3600)
    assert [t for t, _ in await h.sent()].count("bye") == len(delays)


@pytest.mark.parametrize("batch", [3, 1])
async def test_a_send_whose_key_is_already_queued_is_not_queued_again_and_the_step_commits(
        h: Harness, batch: int) -> None:
    """Rounds queue their sends without looking keys up first: the unique key is the guard."""
    from segflowd.flows.work import Work

    app = make_app("winback", winback, behavior="dynamic")
    uids = ["q1", "q2", "q3"][:batch]
    for uid in uids:
        await h.user(uid)
    async with h.running(app) as svc:
        for uid in uids:
            await h.join(uid, "seg")
        insts = {i.user_id: i.id for i in await h.instances()}
        for i in insts.values():  # this test steps by hand
            svc.wheel.cancel(i)
        planted = f"flow:{insts[uids[-1]]}:2"  # the key of that instance's next send
        async with h.store.begin() as conn:
            await conn.execute(sa.insert(messages).values(
                user_id=uids[-1], kind="campaign", template="winback", status="sent",
                attempts=1, dedupe_key=planted, created_at=h.clock.now(),
                updated_at=h.clock.now()))
        h.clock.set(h.clock.now() + dt.timedelta(days=1, seconds=1))
        runs = await svc._stepper._load([Work(insts[u], "timer") for u in uids])
        await svc._stepper._round(runs)
        assert [r.lost for r in runs] == [False] * batch
    async with h.store.connect() as conn:
        keys = [k for (k,) in await conn.execute(sa.select(messages.c.dedupe_key))]
    assert keys.count(planted) == 1
    assert sorted(k for k in keys if k.endswith(":2")) == sorted(
        f"flow:{insts[u]}:2" for u in uids)
    assert [i.seq for i in await h.instances()] == [3] * batch  # every step committed


async def test_statistics_and_actions_report_state_and_refuse_bad_requests(
        h: Harness) -> None:
    from segflowd.errors import FlowError
    from segflowd.flows.wheel import WheelStatistics
    from segflowd.flows.work import FlowStatistics

    app = make_app("onboarding", onboarding)
    await h.user("ro")
    async with h.running(app) as svc:
        await h.join("ro", "seg")
        await svc._recount()
        flows = svc.k.stats["flows"]()
        wheel = svc.k.stats["wheel"]()
        assert isinstance(flows, FlowStatistics)
        assert isinstance(wheel, WheelStatistics)
        assert flows.instances == (("onboarding", "waiting", 1),)
        assert flows.steps == 2  # send_email, wait
        assert (wheel.near, wheel.far, wheel.size) == (0, 1, 1)  # a day away: in the store
        with pytest.raises(FlowError, match="no campaign 'nope'"):
            await svc.k.actions["campaign.pause"]({"campaign": "nope"})
        with pytest.raises(FlowError, match="no flow instance 999"):
            await svc.k.actions["instance.terminate"]({"instance": 999})
        [inst] = await h.instances("ro")
        with pytest.raises(FlowError, match="only diverged or failed"):
            await svc.k.actions["instance.restart"]({"instance": inst.id})
        assert await svc.k.actions["instance.terminate"]({"instance": inst.id}) == {
            "instance": inst.id, "status": "terminated"}
        assert svc.wheel_statistics().far == 0
        await h.advance(5 * DAY)
    assert await h.sent("ro") == [("welcome", 0)]


def greets_event(ctx: Any, rt: Any) -> Generator[object, object, object]:
    ev = ctx.event
    yield rt.send_email("hello", via=ev.name if ev else None,
                        plan=ev.attributes.get("plan") if ev else None)


async def test_ctx_event_is_the_event_that_made_the_user_enter(h: Harness) -> None:
    app = make_app("greet", greets_event)
    await h.user("sue")
    async with h.running(app) as svc:
        now = h.clock.now()
        async with h.store.begin() as conn:
            res = await conn.execute(sa.insert(events).values(
                user_id="sue", name="signup", attributes={"plan": "pro"}, created_at=now,
                received_at=now))
            eid = int(res.inserted_primary_key[0])  # type: ignore[index]
            await conn.execute(sa.insert(segment_members).values(
                segment="seg", user_id="sue", entered_at=now, evaluated_at=now))
        await svc.membership_changed([MembershipChange("seg", "sue", True, now, eid)])
        await h.settle()
    async with h.store.connect() as conn:
        data = (await conn.execute(sa.select(messages.c.data))).scalar_one()
    assert data == {"via": "signup", "plan": "pro"}


def announces(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("launch", code=ctx.data.get("code"))
    yield rt.wait(days=1)
    yield rt.send_email("reminder", code=ctx.data["code"])


async def test_start_flow_starts_once_per_key_with_data_as_ctx_data(h: Harness) -> None:
    app = make_app("launch", announces)
    await h.user("vi")
    async with h.running(app) as svc:
        assert await svc.start_flow("launch", "vi", key="bc:1:vi",
                                    data={"code": "X1"}) == "started"
        assert await svc.start_flow("launch", "vi", key="bc:1:vi",
                                    data={"code": "X1"}) == "exists"
        assert await svc.start_flow("launch", "vi", key="bc:2:vi",
                                    data={}) == "exists"  # a live one
        await h.settle()
    async with h.running(app):  # the data survives a restart: replay answers it
        await h.advance(2 * DAY)
    async with h.store.connect() as conn:
        rows = (await conn.execute(sa.select(messages.c.template, messages.c.data)
                                   .order_by(messages.c.id))).all()
    assert [(t, d) for t, d in rows] == [("launch", {"code": "X1"}),
                                         ("reminder", {"code": "X1"})]
    assert [i.status for i in await h.instances("vi")] == ["completed"]



@contextlib.contextmanager
def store_down(store: Store, *, reads: bool) -> Generator[None, None, None]:
    """The store refuses transactions (and reads, with ``reads``) as if it were down."""
    @contextlib.asynccontextmanager
    async def refused() -> AsyncIterator[Any]:
        raise StoreUnavailable("store unavailable: test outage")
        yield  # pragma: no cover - makes this an async generator

    saved = store.begin, store.connect
    store.begin = refused  # type: ignore[method-assign]
    if reads:
        store.connect = refused  # type: ignore[method-assign]
    try:
        yield
    finally:
        store.begin, store.connect = saved  # type: ignore[method-assign]


async def test_an_event_that_arrives_while_the_store_is_down_still_wakes_its_wait(
        h: Harness) -> None:
    app = make_app("cart", awaiting)
    await h.user("ida")
    async with h.running(app) as svc:
        await h.join("ida", "seg")
        await h.advance(0.5 * DAY)
        batch = await h.committed_event("ida", "purchase", amount=12)
        with store_down(h.store, reads=True):  # the match itself cannot run
            svc.ingested(batch)
            await h.settle()
        assert await h.sent("ida") == []
        await h.advance(2 * flows_work.RESYNC_RETRY)  # the store is back: resync
    assert await h.sent("ida") == [("thanks", 0.5)]


async def test_an_event_wake_whose_step_fails_in_an_outage_is_stepped_once_after_it(
        h: Harness) -> None:
    def twice(ctx: Any, rt: Any) -> Generator[object, object, object]:
        first = yield rt.wait_for_event("purchase", timeout=dt.timedelta(days=5))
        yield rt.send_email("first", amount=first.attributes["amount"])
        second = yield rt.wait_for_event("purchase", timeout=dt.timedelta(days=5))
        yield rt.send_email("second", amount=second.attributes["amount"] if second else None)

    app = make_app("cart", twice)
    await h.user("jan")
    async with h.running(app) as svc:
        await h.join("jan", "seg")
        await h.advance(0.5 * DAY)
        batch = await h.committed_event("jan", "purchase", amount=1)
        with store_down(h.store, reads=False):  # matched, but its step cannot commit
            svc.ingested(batch)
            await h.settle()
        held = list(svc._held_wakes)
        assert [(w.instance, w.kind) for w in held] == [(1, "event")]
        assert await h.sent("jan") == []
        await h.advance(2 * flows_work.RESYNC_RETRY)
        assert await h.sent("jan") == [("first", 0.5)]
        # The same wake delivered again (as when an outage hits after the step committed)
        # finds the instance at a later wait for the same event name: it must not wake it.
        for w in held:
            svc._push(w)
        await h.settle()
        await h.advance(2 * flows_work.RESYNC_RETRY)
    async with h.store.connect() as conn:
        rows = (await conn.execute(sa.select(messages.c.template, messages.c.data)
                                   .order_by(messages.c.id))).all()
    assert [(t, d) for t, d in rows] == [("first", {"amount": 1})]


def misspelt(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("welcom")
    yield rt.wait(days=1)
    yield rt.send_email("after")


async def test_sending_an_unknown_template_fails_the_instance_naming_it(h: Harness) -> None:
    """#16 defect 2: the flow does not carry on to its wait as if it had sent."""
    app = Segflow()
    app.segment("seg", sql="SELECT id FROM users")
    app.template("after", subject="s", html="after.html")
    app.campaign("typo", segments=["seg"])(misspelt)  # type: ignore[arg-type]
    failed = h.bus.subscribe(kinds=frozenset({"flow.failed"}))
    await h.user("ann")
    async with h.running(app):
        await h.join("ann", "seg")
        await h.advance(2 * DAY)
    [inst] = await h.instances("ann")
    assert inst.status == "failed"
    assert "unknown template 'welcom'" in inst.error
    assert await h.sent("ann") == []
    [event] = failed.drain()[0]
    assert "welcom" in str(event.data["error"])
