"""Goals on real stores (SQLite and MariaDB): a campaign's goal event within its window
converts, attributed to the campaign's latest sent message, once per message; exit_on_goal
ends the live instance; a restart catches up; a forget keeps the count. Then the same
through Simulation, with the real flows sending the messages."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.cursors import load_cursor
from segflowd.flows.goals import CONVERSIONS_METRIC, CURSOR_NAME, GoalService
from segflowd.flows.service import FlowService
from segflowd.hooks import IngestBatch, StoredEvent
from segflowd.ingest.users import forget_user
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import conversions, events, flow_instances, messages, users
from segflowd.store import Store
from segflowd.testing import FakeClock, Simulation

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 3, 10, 12, 0, 0)
DAY = dt.timedelta(days=1)


def make_app(*, goals: bool = True) -> Segflow:
    app = Segflow(templates="templates")
    app.segment("everyone", sql="SELECT id FROM users")

    def flow(ctx: object, rt: object) -> object:
        yield None

    if goals:
        app.campaign("welcome", segments=["everyone"], goal=("purchase", "7d"),
                     exit_on_goal=True)(flow)
        app.campaign("winback", segments=["everyone"], goal=("purchase", "3d"))(flow)
    app.campaign("news", segments=["everyone"])(flow)  # no goal
    return app


@dataclasses.dataclass
class H:
    store: Store
    kernel: Kernel
    flows: FlowService
    goals: GoalService

    async def user(self, uid: str) -> None:
        async with self.store.begin() as conn:
            await conn.execute(sa.insert(users).values(
                id=uid, email=f"{uid}@example.com", attributes={}, created_at=NOW,
                updated_at=NOW))

    async def message(self, campaign: str, uid: str, template: str,
                      sent_at: dt.datetime | None, variant: str | None = None) -> int:
        async with self.store.begin() as conn:
            res = await conn.execute(sa.insert(messages).values(
                user_id=uid, kind="campaign", campaign=campaign, template=template,
                variant=variant, status="sent" if sent_at else "queued",
                created_at=sent_at or NOW, updated_at=sent_at or NOW, sent_at=sent_at))
        pk = res.inserted_primary_key
        assert pk is not None
        return int(pk[0])

    async def instance(self, campaign: str, uid: str, status: str = "waiting") -> int:
        live = 1 if status in ("running", "waiting") else None
        async with self.store.begin() as conn:
            res = await conn.execute(sa.insert(flow_instances).values(
                campaign=campaign, user_id=uid, version="v1", status=status, live=live,
                seq=1, wake_at=NOW + DAY if status == "waiting" else None,
                created_at=NOW, updated_at=NOW))
        pk = res.inserted_primary_key
        assert pk is not None
        return int(pk[0])

    async def event(self, uid: str, name: str, at: dt.datetime = NOW) -> IngestBatch:
        async with self.store.begin() as conn:
            res = await conn.execute(sa.insert(events).values(
                user_id=uid, name=name, attributes={}, created_at=at, received_at=at))
        pk = res.inserted_primary_key
        assert pk is not None
        e = StoredEvent(id=int(pk[0]), user_id=uid, anonymous_id=None, name=name,
                        attributes={}, created_at=at, received_at=at)
        return IngestBatch(users=frozenset({uid}), events=(e,))

    async def conversions(self) -> list[sa.Row[tuple[object, ...]]]:
        c = conversions.c
        async with self.store.connect() as conn:
            return list((await conn.execute(
                sa.select(c.campaign, c.message_id, c.user_id, c.template, c.variant,
                          c.event_id, c.event_name, c.converted_at)
                .order_by(c.campaign, c.id))).all())

    async def status(self, iid: int) -> tuple[object, object]:
        fi = flow_instances.c
        async with self.store.connect() as conn:
            row = (await conn.execute(sa.select(fi.status, fi.live)
                                      .where(fi.id == iid))).one()
        return row[0], row[1]


def kernel_for(store: Store, tmp_path: Path, *, goals: bool = True) -> Kernel:
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                    '[providers.outbox]\nplugin = "outbox"\n')
    return Kernel(config=load_config(path, environ={}), app=make_app(goals=goals),
                  store=store, clock=FakeClock(NOW), bus=Bus(), metrics=Metrics())


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> H:
    kernel = kernel_for(store, tmp_path)
    flows = FlowService(kernel)
    goals = GoalService(kernel, flows=flows)
    await goals.start()
    return H(store, kernel, flows, goals)


async def test_two_campaigns_with_one_goal_each_convert_on_their_own_latest_message(
        h: H) -> None:
    await h.user("ann")
    await h.user("bob")
    await h.message("welcome", "ann", "w1", NOW - 5 * DAY, variant="A")
    m2 = await h.message("welcome", "ann", "w2", NOW - 2 * DAY, variant="B")
    await h.message("welcome", "ann", "w3", None)  # queued, never sent
    await h.message("welcome", "ann", "w4", NOW + dt.timedelta(hours=1))  # after the event
    await h.message("welcome", "bob", "w9", NOW - dt.timedelta(hours=1))  # someone else's
    m4 = await h.message("winback", "ann", "wb", NOW - DAY)
    await h.message("news", "ann", "n1", NOW - DAY)  # a campaign without a goal
    sub = h.kernel.bus.subscribe()
    batch = await h.event("ann", "purchase")
    h.goals.ingested(batch)
    await h.goals.process_pending()
    eid = batch.events[0].id
    assert [tuple(r) for r in await h.conversions()] == [
        ("welcome", m2, "ann", "w2", "B", eid, "purchase", NOW),
        ("winback", m4, "ann", "wb", None, eid, "purchase", NOW)]
    seen = [e for e in sub.drain()[0] if e.kind == "goal.converted"]
    assert sorted((e.data["campaign"], e.data["message_id"]) for e in seen) == [
        ("welcome", m2), ("winback", m4)]
    assert h.kernel.metrics.value(CONVERSIONS_METRIC, campaign="welcome") == 1
    assert h.goals.statistics().converted == 2


async def test_an_event_outside_the_window_or_before_any_message_does_not_convert(
        h: H) -> None:
    await h.user("ann")
    await h.user("cat")
    await h.message("winback", "ann", "wb", NOW - 3 * DAY - dt.timedelta(seconds=1))
    await h.message("welcome", "ann", "w1", NOW + dt.timedelta(minutes=1))
    edge = await h.message("winback", "cat", "wb", NOW - 3 * DAY)  # exactly the window
    h.goals.ingested(await h.event("ann", "purchase"))
    h.goals.ingested(await h.event("cat", "purchase"))
    await h.goals.process_pending()
    assert [(r.user_id, r.message_id) for r in await h.conversions()] == [("cat", edge)]
    # ann: winback's message is a second too old, welcome's came after the event; cat
    # has no welcome message at all
    assert h.goals.statistics().unattributed == 3


async def test_a_message_converts_once_even_with_two_goal_events(h: H) -> None:
    await h.user("ann")
    m1 = await h.message("winback", "ann", "wb", NOW - DAY)
    first = await h.event("ann", "purchase")
    h.goals.ingested(first)
    h.goals.ingested(first)  # the same commit handed over twice
    h.goals.ingested(await h.event("ann", "purchase", NOW + dt.timedelta(hours=1)))
    await h.goals.process_pending()
    await h.goals.process(first.events)  # and again, as a catch-up would
    rows = [r for r in await h.conversions() if r.campaign == "winback"]
    assert [(r.message_id, r.event_id) for r in rows] == [(m1, first.events[0].id)]
    assert h.goals.statistics().duplicates == 2


async def test_a_late_event_converts_on_the_latest_message_before_its_own_time(
        h: H) -> None:
    """An event sent late (its timestamp days old, its id the newest) is placed by its time."""
    await h.user("ann")
    m1 = await h.message("welcome", "ann", "w1", NOW - 3 * DAY)
    await h.message("welcome", "ann", "w2", NOW - DAY)
    h.goals.ingested(await h.event("ann", "purchase", NOW - 2 * DAY))
    await h.goals.process_pending()
    assert [(r.message_id, r.converted_at) for r in await h.conversions()] == [
        (m1, NOW - 2 * DAY)]


async def test_exit_on_goal_ends_the_live_instance_and_a_campaign_without_it_runs_on(
        h: H) -> None:
    await h.user("ann")
    await h.user("dan")
    await h.message("welcome", "ann", "w1", NOW - DAY)
    await h.message("winback", "ann", "wb", NOW - DAY)
    welcome = await h.instance("welcome", "ann")
    winback = await h.instance("winback", "ann")
    # dan's instance ended before his goal event (a step completed it): nothing to exit
    await h.message("welcome", "dan", "w1", NOW - DAY)
    done = await h.instance("welcome", "dan", status="completed")
    sub = h.kernel.bus.subscribe()
    h.goals.ingested(await h.event("ann", "purchase"))
    h.goals.ingested(await h.event("dan", "purchase"))
    await h.goals.process_pending()
    assert await h.status(welcome) == ("exited", None)
    assert await h.status(winback) == ("waiting", 1)
    assert await h.status(done) == ("completed", None)
    exits = [e.data for e in sub.drain()[0] if e.kind == "flow.exited"]
    assert exits == [{"campaign": "welcome", "user_id": "ann", "instance": welcome,
                      "reason": "goal"}]
    assert len(await h.conversions()) == 3  # ann twice, dan once: the exit is separate
    assert h.goals.statistics().exited == 1


async def test_exit_on_goal_racing_a_continue_as_new_ends_the_successor(h: H) -> None:
    """A step that ends the instance and starts its successor commits while the goal
    engine waits on the instance's row: the exit goes to the successor, once."""
    if h.store.dialect == "sqlite":
        pytest.skip("SQLite serialises writers: no read-then-update window")
    await h.user("ann")
    await h.message("welcome", "ann", "w1", NOW - DAY)
    old = await h.instance("welcome", "ann")
    h.goals.ingested(await h.event("ann", "purchase"))
    fi = flow_instances.c
    async with h.store.engine.connect() as step:
        tx = await step.begin()
        await step.execute(sa.update(flow_instances).where(fi.id == old, fi.live == 1)
                           .values(status="completed", live=None, ended_at=NOW))
        res = await step.execute(sa.insert(flow_instances).values(
            campaign="welcome", user_id="ann", version="v1", status="running", live=1,
            seq=0, created_at=NOW, updated_at=NOW))
        pk = res.inserted_primary_key
        assert pk is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.goals.process_pending)
            await anyio.sleep(0.2)  # the goal engine reaches the locked row (or not yet)
            assert await h.conversions() == []  # nothing is committed before the step is
            await tx.commit()
    assert await h.status(old) == ("completed", None)
    assert await h.status(int(pk[0])) == ("exited", None)
    assert len(await h.conversions()) == 1


async def test_a_restart_catches_up_with_goal_events_stored_while_it_was_down(
        h: H, tmp_path: Path) -> None:
    await h.user("ann")
    await h.user("bob")
    await h.message("winback", "ann", "wb", NOW - DAY)
    m2 = await h.message("winback", "bob", "wb", NOW - DAY)
    h.goals.ingested(await h.event("ann", "purchase"))
    await h.goals.process_pending()
    # down: these are committed and never handed over
    missed = await h.event("bob", "purchase")
    await h.event("bob", "signup")
    kernel = kernel_for(h.store, tmp_path)
    again = GoalService(kernel, flows=FlowService(kernel))
    await again.start()
    rows = await h.conversions()
    assert [(r.user_id, r.message_id, r.event_id) for r in rows if r.user_id == "bob"] == [
        ("bob", m2, missed.events[0].id)]
    assert len(rows) == 2  # ann's conversion was not made twice
    async with h.store.connect() as conn:
        cursor = await load_cursor(conn, CURSOR_NAME)
    assert cursor is not None
    assert cursor.last_event_id == missed.events[0].id + 1  # past the signup too


async def test_the_first_start_on_a_store_does_not_convert_history(
        store: Store, tmp_path: Path) -> None:
    kernel = kernel_for(store, tmp_path)
    h = H(store, kernel, FlowService(kernel), GoalService(kernel))
    await h.user("ann")
    await h.message("winback", "ann", "wb", NOW - DAY)
    await h.event("ann", "purchase")
    await h.goals.start()
    assert await h.conversions() == []


async def test_forgetting_a_user_keeps_the_conversion_without_their_id(h: H) -> None:
    await h.user("ann")
    m1 = await h.message("winback", "ann", "wb", NOW - DAY)
    h.goals.ingested(await h.event("ann", "purchase"))
    await h.goals.process_pending()
    async with h.store.begin() as conn:
        assert await forget_user(conn, "ann", NOW)
    assert [(r.campaign, r.message_id, r.user_id) for r in await h.conversions()] == [
        ("winback", m1, None)]


async def test_a_goal_event_of_a_user_forgotten_before_it_was_processed_converts_nothing(
        h: H) -> None:
    await h.user("ann")
    await h.message("winback", "ann", "wb", NOW - DAY)
    batch = await h.event("ann", "purchase")
    async with h.store.begin() as conn:
        await forget_user(conn, "ann", NOW)
    h.goals.ingested(batch)
    await h.goals.process_pending()
    assert await h.conversions() == []


SIM_APP = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.segment("everyone", sql="SELECT id FROM users")
app.template("hello", subject="Hello", html="plain.html")
app.template("nudge", subject="Still there?", html="plain.html")
app.template("last", subject="Last call", html="plain.html")
app.template("news", subject="News", html="plain.html")
app.template("more", subject="More news", html="plain.html")

@app.campaign("onboarding", segments=["everyone"], goal=("purchase", "2d"),
              exit_on_goal=True)
def onboarding(ctx, rt):
    yield rt.send_email("hello")
    yield rt.wait(days=1)
    yield rt.send_email("nudge")
    yield rt.wait(days=5)
    yield rt.send_email("last")

@app.campaign("newsletter", segments=["everyone"], goal=("purchase", "7d"))
def newsletter(ctx, rt):
    yield rt.send_email("news")
    yield rt.wait(days=10)
    yield rt.send_email("more")
"""


def test_simulation_converts_and_exit_on_goal_ends_only_that_flow(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "plain.html").write_text("<p>{{ user.name }}</p>")
    (tmp_path / "app.py").write_text(SIM_APP)
    with Simulation(f"{tmp_path / 'app.py'}:app", start="2026-03-01T09:00:00Z") as sim:
        sim.user("ann", email="ann@example.com", name="Ann")
        sim.advance(days=1, hours=2)
        sim.event("ann", "purchase")
        sim.advance(days=12)
        converted = sorted((e.detail["campaign"], e.detail["template"])
                           for e in sim.timeline("ann") if e.kind == "goal.converted")
        assert converted == [("newsletter", "news"), ("onboarding", "nudge")]
        exits = [e.detail for e in sim.timeline("ann") if e.kind == "flow.exited"]
        assert [(x["campaign"], x["reason"]) for x in exits] == [("onboarding", "goal")]
        # onboarding ended before its last mail; the newsletter ran to its end
        assert sorted(m.template for m in sim.sent("ann")) == ["hello", "more", "news",
                                                               "nudge"]


async def test_the_daemon_runs_goals_with_or_without_a_goal(
        store: Store, tmp_path: Path) -> None:
    """Without a goal the service only keeps its cursor current (see
    test_goals_adversarial: a goal added back converts nothing of the time before)."""
    from segflowd.daemon import build_services

    assert "goals" in [s.name for s in build_services(kernel_for(store, tmp_path))]
    plain = kernel_for(store, tmp_path, goals=False)
    assert "goals" in [s.name for s in build_services(plain)]
