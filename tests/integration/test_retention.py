"""Retention on SQLite and MariaDB: each kind goes after its age and not before, in
batches, and nothing a live part of the daemon still needs (or that keeps a send from
happening twice) is ever pruned."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Generator
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.daemon import build_services
from segflowd.flows.entries import CHANGES_CURSOR
from segflowd.flows.service import FlowService
from segflowd.flows.wakes import CURSOR_NAME as FLOW_EVENTS_CURSOR
from segflowd.ingest.users import id_hash
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.retention import rules
from segflowd.retention.service import FIRST_PASS_DELAY, RetentionService
from segflowd.schema import (
    broadcasts,
    campaign_versions,
    engagement,
    engine_cursors,
    events,
    flow_instances,
    flow_journal,
    forgotten,
    message_events,
    messages,
    segment_changes,
)
from segflowd.segments.engine import CURSOR_NAME as SEGMENTS_CURSOR
from segflowd.segments.transactions import CURSOR_NAME as TRANSACTIONS_CURSOR
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)  # when the old data was made
DAY = dt.timedelta(days=1)
RETENTION = """
[retention]
finished_instances = "90d"
segment_changes = "30d"
messages = "60d"
events = "120d"
"""


def flow(ctx: object, rt: object) -> Generator[object, object, None]:
    yield None


def make_app() -> Segflow:
    app = Segflow()
    app.segment("everyone", sql="SELECT id FROM users")
    app.campaign("onboarding", segments=["everyone"])(flow)  # static, no reentry
    app.campaign("nudge", segments=["everyone"], behavior="dynamic")(flow)
    app.campaign("again", segments=["everyone"], reentry=True)(flow)
    return app


@dataclasses.dataclass
class H:
    store: Store
    clock: FakeClock
    kernel: Kernel
    svc: RetentionService

    # -- seeding -------------------------------------------------------------------

    async def _insert(self, table: sa.Table, **values: object) -> int:
        async with self.store.begin() as conn:
            pk = (await conn.execute(sa.insert(table).values(**values))).inserted_primary_key
        assert pk is not None
        return int(pk[0])

    async def _put(self, table: sa.Table, **values: object) -> None:
        async with self.store.begin() as conn:
            await conn.execute(sa.insert(table).values(**values))

    async def instance(self, campaign: str, status: str, *, created: dt.datetime = T0,
                       ended: dt.datetime | None = T0, journal: int = 3,
                       entry_event: int | None = None, start_key: str | None = None,
                       user: str = "ann") -> int:
        live = 1 if status in ("running", "waiting", "diverged") else None
        iid = await self._insert(
            flow_instances, campaign=campaign, user_id=user, version="v1", status=status,
            live=live, seq=journal, entry_event_id=entry_event, start_key=start_key,
            created_at=created, updated_at=ended or created,
            ended_at=ended if live is None else None)
        if journal:
            async with self.store.begin() as conn:
                await conn.execute(sa.insert(flow_journal), [
                    {"instance_id": iid, "seq": s, "kind": "send_email", "name": "welcome",
                     "args_hash": "h", "result": {"value": None}, "created_at": created}
                    for s in range(journal)])
        return iid

    async def event(self, at: dt.datetime = T0, user: str | None = "ann") -> int:
        return await self._insert(events, user_id=user, anonymous_id=None, name="seen",
                                  attributes={}, created_at=at, received_at=at)

    async def message(self, status: str = "sent", *, at: dt.datetime = T0,
                      updated: dt.datetime | None = None, key: str | None = None,
                      instance: int | None = None) -> int:
        return await self._insert(
            messages, user_id="ann", kind="campaign", template="welcome", status=status,
            instance_id=instance, dedupe_key=key, created_at=at, updated_at=updated or at,
            attempts=1)

    async def opened(self, message: int) -> None:
        await self._insert(engagement, message_id=message, user_id="ann", kind="open",
                           created_at=T0)

    async def change(self, at: dt.datetime = T0) -> int:
        return await self._insert(segment_changes, segment="everyone", user_id="ann",
                                  entered=True, at=at)

    async def cursor(self, name: str, last: int) -> None:
        await self._put(engine_cursors, name=name, last_event_id=last, updated_at=T0)

    async def broadcast(self, status: str) -> int:
        return await self._insert(
            broadcasts, template="welcome", segment="everyone", rate=10.0, status=status,
            created_at=T0, updated_at=T0)

    # -- reading -------------------------------------------------------------------

    async def ids(self, table: sa.Table) -> list[int]:
        async with self.store.connect() as conn:
            return [int(i) for (i,) in await conn.execute(
                sa.select(table.c.id).order_by(table.c.id))]

    async def journal_of(self, iid: int) -> int:
        async with self.store.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).where(
                flow_journal.c.instance_id == iid))).scalar_one())

    async def count(self, table: sa.Table) -> int:
        async with self.store.connect() as conn:
            return int((await conn.execute(
                sa.select(sa.func.count()).select_from(table))).scalar_one())

    async def prune_at(self, when: dt.datetime) -> None:
        self.clock.set(when)
        await self.svc.prune_once()


def kernel_for(store: Store, clock: FakeClock, tmp_path: Path, retention: str,
               app: Segflow | None = None) -> Kernel:
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[providers.outbox]\nplugin = "outbox"\n'
                    + retention)
    return Kernel(config=load_config(path, environ={}), app=app or make_app(), store=store,
                  clock=clock, bus=Bus(), metrics=Metrics())


def harness(store: Store, tmp_path: Path, retention: str = RETENTION) -> H:
    clock = FakeClock(T0)
    k = kernel_for(store, clock, tmp_path, retention)
    return H(store, clock, k, RetentionService(k, pause=0))


@pytest.fixture
def h(store: Store, tmp_path: Path) -> H:
    return harness(store, tmp_path)


@pytest.fixture
def small_catch_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flows' no-cursor catch-up window, 10,000 changes, as 2 (so a test needs few)."""
    monkeypatch.setattr(rules, "CATCH_UP_CHANGES", 2)


# -- instances -------------------------------------------------------------------------


async def test_an_ended_instance_and_its_journal_go_after_their_age_and_not_before(
        h: H) -> None:
    old = await h.instance("nudge", "completed", journal=4)
    newest = await h.instance("nudge", "completed", created=T0 + DAY, ended=T0 + DAY)
    await h.prune_at(T0 + 89 * DAY)
    assert await h.ids(flow_instances) == [old, newest]
    assert await h.journal_of(old) == 4
    await h.prune_at(T0 + 91 * DAY)
    assert await h.ids(flow_instances) == [newest]  # the newest row stays: ids never reused
    assert await h.journal_of(old) == 0
    assert h.svc.statistics().pruned[:2] == (("instances", 1), ("journal_rows", 4))


async def test_every_ended_status_goes_but_live_and_diverged_instances_stay(h: H) -> None:
    ended = [await h.instance("again", s) for s in ("completed", "exited", "terminated",
                                                    "failed")]
    live = [await h.instance("again", s, ended=None, user=f"u{s}")
            for s in ("running", "waiting", "diverged")]
    await h.prune_at(T0 + 400 * DAY)
    assert await h.ids(flow_instances) == live
    assert all([await h.journal_of(i) == 0 for i in ended])
    assert all([await h.journal_of(i) == 3 for i in live])


async def test_a_static_campaign_keeps_the_record_of_an_entry_and_drops_its_journal(
        h: H) -> None:
    once = await h.instance("onboarding", "completed")
    await h._put(campaign_versions, campaign="retired", version="v1", source="",
                    created_at=T0)  # recorded when it ran; no longer in the app
    gone = await h.instance("retired", "completed", user="bo")
    await h.instance("again", "waiting", ended=None, created=T0 + DAY)  # the newest
    await h.prune_at(T0 + 100 * DAY)
    assert once in await h.ids(flow_instances)
    assert gone in await h.ids(flow_instances)  # what it was is not known: kept too
    assert await h.journal_of(once) == 0
    assert await h.journal_of(gone) == 0
    for later in (T0 + 100 * DAY + dt.timedelta(hours=1), T0 + 102 * DAY):  # then a rescan
        h.clock.set(later)
        again = await h.svc.prune_once()
        assert (again.instances, again.journal_rows) == (0, 0)
    assert len(await h.ids(flow_instances)) == 3


async def test_a_pruned_static_entry_still_keeps_the_user_from_entering_again(
        store: Store, tmp_path: Path) -> None:
    """The engine's own entry check, after retention, still finds the record."""
    h = harness(store, tmp_path)
    await h.instance("onboarding", "completed")
    await h.instance("again", "waiting", ended=None, created=T0 + DAY, user="zed")
    await h.prune_at(T0 + 100 * DAY)
    flows = FlowService(h.kernel)
    assert await flows.enter(h.kernel.app.campaigns["onboarding"], "ann") is None
    assert await h.count(flow_instances) == 2


async def test_an_instance_a_replayed_segment_change_may_have_started_keeps_its_row(
        h: H, small_catch_up: None) -> None:
    """Changes the flows replay at start skip an entry only where they find its instance."""
    older = await h.instance("nudge", "completed", created=T0, ended=T0 + DAY)
    replayed = await h.instance("nudge", "completed", created=T0 + 2 * DAY,
                                ended=T0 + 3 * DAY)
    await h.instance("nudge", "waiting", ended=None, created=T0 + 5 * DAY, user="zed")
    for day in (1, 2, 2, 4):  # the newest two (days 2 and 4) are replayed at start
        await h.change(T0 + day * DAY)
    await h.prune_at(T0 + 200 * DAY)
    ids = await h.ids(flow_instances)
    assert older not in ids
    assert replayed in ids
    assert await h.journal_of(replayed) == 0


async def test_changes_above_the_flows_cursor_protect_instances_too(
        h: H, small_catch_up: None) -> None:
    first = await h.change(T0)
    for day in (1, 2, 3):
        await h.change(T0 + day * DAY)
    await h.cursor(CHANGES_CURSOR, first)  # changes 2..4 not yet handed to flows
    kept = await h.instance("nudge", "completed", created=T0 + DAY, ended=T0 + DAY)
    await h.instance("nudge", "waiting", ended=None, created=T0 + 5 * DAY, user="zed")
    await h.prune_at(T0 + 200 * DAY)
    assert kept in await h.ids(flow_instances)
    assert len(await h.ids(segment_changes)) == 3  # only the first was below the cursor


async def test_a_running_broadcasts_started_instance_keeps_its_start_key(h: H) -> None:
    running = await h.broadcast("running")
    done = await h.broadcast("completed")
    kept = await h.instance("nudge", "completed", start_key=f"bc:{running}:ann")
    gone = await h.instance("nudge", "completed", start_key=f"bc:{done}:bo", user="bo")
    odd = await h.instance("nudge", "completed", start_key="other:1", user="cy")
    await h.instance("nudge", "waiting", ended=None, created=T0 + DAY, user="zed")
    await h.prune_at(T0 + 100 * DAY)
    ids = await h.ids(flow_instances)
    assert kept in ids
    assert odd in ids
    assert gone not in ids


async def test_an_instance_that_ends_long_after_it_began_goes_after_its_own_age(h: H) -> None:
    long = await h.instance("nudge", "waiting", ended=None)
    await h.instance("nudge", "waiting", ended=None, created=T0 + DAY, user="zed")
    await h.prune_at(T0 + 100 * DAY)  # passes it while it waits
    async with h.store.begin() as conn:
        await conn.execute(sa.update(flow_instances).where(flow_instances.c.id == long)
                           .values(status="completed", live=None,
                                   ended_at=T0 + 100 * DAY))
    await h.prune_at(T0 + 189 * DAY)
    assert long in await h.ids(flow_instances)
    await h.prune_at(T0 + 191 * DAY)
    assert long not in await h.ids(flow_instances)


# -- messages --------------------------------------------------------------------------


async def test_finished_messages_go_with_their_engagement_and_unfinished_ones_never(
        h: H) -> None:
    finished = [await h.message(s) for s in ("sent", "failed", "suppressed", "unknown")]
    for m in finished:
        await h.opened(m)
        await h._put(message_events, message_id=m, kind="delivered", created_at=T0)
    pending = [await h.message(s) for s in ("queued", "claimed", "sending")]
    newest = await h.message("sent", at=T0 + DAY)
    await h.prune_at(T0 + 59 * DAY)
    assert len(await h.ids(messages)) == 8
    await h.prune_at(T0 + 365 * DAY)
    assert await h.ids(messages) == [*pending, newest]
    assert await h.count(engagement) == 0
    assert await h.count(message_events) == 0


async def test_a_message_touched_within_its_age_stays(h: H) -> None:
    retried = await h.message("failed", updated=T0 + 50 * DAY)
    await h.message("sent", at=T0 + DAY)
    await h.prune_at(T0 + 61 * DAY)
    assert retried in await h.ids(messages)
    await h.prune_at(T0 + 111 * DAY)
    assert retried not in await h.ids(messages)


async def test_a_message_goes_only_once_its_dedupe_key_cannot_be_enqueued_again(
        h: H) -> None:
    live = await h.instance("nudge", "waiting", ended=None, user="bo")
    ended = await h.instance("nudge", "completed")
    running, done = await h.broadcast("running"), await h.broadcast("completed")
    await h.cursor(TRANSACTIONS_CURSOR, 100)
    kept = [await h.message(key=f"flow:{live}:0", instance=live),
            await h.message(key="tx:101:receipt"),  # its event is processed again at start
            await h.message(key=f"bc:{running}:ann"),
            await h.message(key="someone-elses:1")]
    gone = [await h.message(key=f"flow:{ended}:0", instance=ended),
            await h.message(key="tx:100:receipt"),
            await h.message(key=f"bc:{done}:ann"),
            await h.message(key=None),
            await h.message(key="send:order-77")]  # an Idempotency-Key holds for the age
    newest = await h.message(at=T0 + DAY)
    await h.prune_at(T0 + 100 * DAY)
    assert await h.ids(messages) == [*kept, newest]
    assert len(gone) == 5


# -- segment changes and events ----------------------------------------------------------


async def test_segment_changes_go_after_their_age_but_never_the_replay_window(
        h: H, small_catch_up: None) -> None:
    old = [await h.change(T0) for _ in range(3)]
    recent = [await h.change(T0 + 40 * DAY) for _ in range(3)]
    await h.prune_at(T0 + 29 * DAY)
    assert await h.ids(segment_changes) == [*old, *recent]
    await h.prune_at(T0 + 31 * DAY)
    assert await h.ids(segment_changes) == recent
    await h.prune_at(T0 + 400 * DAY)
    assert await h.ids(segment_changes) == recent[-2:]  # the newest 2 are replayed at start


async def test_events_go_after_their_age_but_entry_events_and_cursors_hold_them(
        h: H) -> None:
    live_entry, failed_entry, ended_entry, plain = [await h.event() for _ in range(4)]
    above = await h.event(T0 + DAY)
    newest = await h.event(T0 + 2 * DAY)
    await h.instance("nudge", "waiting", ended=None, entry_event=live_entry)
    await h.instance("again", "failed", entry_event=failed_entry, created=T0 + 300 * DAY,
                     ended=T0 + 300 * DAY)
    await h.instance("again", "completed", entry_event=ended_entry, user="bo",
                     created=T0 + 300 * DAY, ended=T0 + 300 * DAY)
    for name in (SEGMENTS_CURSOR, TRANSACTIONS_CURSOR):
        await h.cursor(name, newest)
    await h.cursor(FLOW_EVENTS_CURSOR, plain)  # `above` is still to be matched to waits
    await h.prune_at(T0 + 119 * DAY)
    assert len(await h.ids(events)) == 6
    await h.prune_at(T0 + 300 * DAY)
    assert await h.ids(events) == [live_entry, failed_entry, above, newest]


async def test_anonymous_events_go_like_any_other(h: H) -> None:
    await h.event(user=None)
    newest = await h.event(T0 + DAY)
    await h.prune_at(T0 + 200 * DAY)
    assert await h.ids(events) == [newest]


# -- batches, forever, the service -------------------------------------------------------


async def test_batches_of_1000_prune_2500_rows_of_every_kind(
        h: H, small_catch_up: None) -> None:
    async with h.store.begin() as conn:
        await conn.execute(sa.insert(events), [
            {"user_id": f"u{i}", "name": "seen", "attributes": {}, "created_at": T0,
             "received_at": T0} for i in range(2500)])
        await conn.execute(sa.insert(segment_changes), [
            {"segment": "everyone", "user_id": f"u{i}", "entered": True, "at": T0 + DAY}
            for i in range(2500)])  # after the instances began: none can be their entry
        await conn.execute(sa.insert(messages), [
            {"user_id": f"u{i}", "kind": "test", "template": "t", "status": "sent",
             "created_at": T0, "updated_at": T0} for i in range(2500)])
        await conn.execute(sa.insert(flow_instances), [
            {"campaign": "nudge", "user_id": f"u{i}", "version": "v", "status": "completed",
             "seq": 1, "created_at": T0, "updated_at": T0, "ended_at": T0}
            for i in range(2500)])
    ids = await h.ids(flow_instances)
    async with h.store.begin() as conn:
        await conn.execute(sa.insert(flow_journal), [
            {"instance_id": i, "seq": 0, "kind": "exit", "args_hash": "h", "created_at": T0}
            for i in ids])
    long = await h.instance("nudge", "completed", journal=2500, user="long")
    await h.instance("nudge", "waiting", ended=None, created=T0 + DAY, user="zed")
    h.clock.set(T0 + 400 * DAY)
    done = await h.svc.prune_once()
    # the newest row of each table stays; of segment changes, the newest 2 (the replay)
    assert (done.events, done.segment_changes, done.messages) == (2499, 2498, 2499)
    assert (done.instances, done.journal_rows) == (2501, 5000)
    assert done.complete
    assert await h.journal_of(long) == 0
    assert await h.count(flow_journal) == 3  # the waiting instance's


async def test_forever_prunes_nothing(store: Store, tmp_path: Path) -> None:
    h = harness(store, tmp_path, '[retention]\nfinished_instances = "forever"\n'
                'segment_changes = "forever"\nmessages = "forever"\nevents = "forever"\n'
                'forget_window = "forever"\n')
    assert not h.svc.enabled
    ended = await h.instance("nudge", "completed")
    await h.instance("nudge", "completed", created=T0 + DAY)
    for _ in range(2):
        await h.event()
        await h.message()
        await h.change()
    done = await h.svc.prune_once()
    h.clock.set(T0 + 10_000 * DAY)
    done = await h.svc.prune_once()
    assert (done.instances, done.journal_rows, done.messages, done.events,
            done.segment_changes) == (0, 0, 0, 0, 0)
    assert await h.journal_of(ended) == 3
    assert [await h.count(t) for t in (events, messages, segment_changes)] == [2, 2, 2]


async def test_after_a_drain_no_batch_begins(h: H) -> None:
    for _ in range(3):
        await h.message()
    await h.svc.drain()
    h.clock.set(T0 + 400 * DAY)
    done = await h.svc.prune_once()
    assert not done.complete
    assert done.messages == 0
    assert await h.count(messages) == 3


async def test_statistics_and_metrics_count_what_went(h: H) -> None:
    await h.event()
    for _ in range(3):
        await h.message()
    await h.prune_at(T0 + 200 * DAY)
    st = h.svc.statistics()
    assert (st.passes, st.failures, st.running) == (1, 0, False)
    assert st.last_pass_at == T0 + 200 * DAY
    assert dict(st.pruned)["messages"] == 2
    assert dict(st.keep) == {"finished_instances": 90 * 86400.0, "messages": 60 * 86400.0,
                             "segment_changes": 30 * 86400.0, "events": 120 * 86400.0,
                             "tombstones": 30 * 86400.0}
    text = h.kernel.metrics.render()
    assert 'segflow_retention_pruned_total{kind="messages"} 2' in text
    assert "segflow_retention_passes_total 1" in text
    assert h.kernel.stats["retention"]() == st


async def test_tombstones_go_once_the_forget_window_has_passed(h: H) -> None:
    """A tombstone (a hash of a guessable id) outlives its use only to tell whoever reads
    the store that the id was forgotten: it goes once ``forget_window`` has passed."""
    await h._put(forgotten, id_hash=id_hash("old"), forgotten_at=T0)
    await h._put(forgotten, id_hash=id_hash("recent"), forgotten_at=T0 + 20 * DAY)
    await h.prune_at(T0 + 35 * DAY)
    async with h.store.connect() as conn:
        left = set((await conn.execute(sa.select(forgotten.c.id_hash))).scalars())
    assert left == {id_hash("recent")}
    assert dict(h.svc.statistics().pruned)["tombstones"] == 1


async def passes(svc: RetentionService, n: int) -> None:
    """Wait (real time, up to 10 s) until the service has finished ``n`` passes."""
    for _ in range(1000):
        if svc.statistics().passes >= n:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"{n} passes did not finish: {svc.statistics()}")


async def test_the_service_prunes_on_its_interval_on_the_kernels_clock(h: H) -> None:
    for _ in range(2):
        await h.message()
    h.clock.set(T0 + 100 * DAY)
    async with anyio.create_task_group() as tg:
        await tg.start(h.svc.run)
        assert h.svc.statistics().passes == 0
        await h.clock.advance(FIRST_PASS_DELAY)
        await passes(h.svc, 1)
        assert await h.count(messages) == 1
        await h.clock.advance(h.kernel.config.retention.interval)
        await passes(h.svc, 2)
        await h.svc.drain()
        tg.cancel_scope.cancel()


async def test_the_daemon_runs_retention_after_the_services_whose_state_it_reads(
        h: H) -> None:
    names = [s.name for s in build_services(h.kernel)]
    assert "retention" in names
    assert names.index("retention") > max(names.index(n) for n in (
        "flows", "segments", "transactions", "broadcasts"))
