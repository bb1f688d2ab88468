"""The flow service: campaign entries and exits, durable steps, and the timer wheel.

Each command a flow yields is one step and one store transaction: its journal row, the
instance's new state, and (for ``send_email``) the outbox row. Every step's instance
update is conditional on the sequence number it started from, so a step that lost a
race (the user exited, an operator terminated it, the event and the timeout arrived
together) changes nothing. Waits store an absolute ``wake_at``; those due within
:data:`HORIZON` sit in the in-memory :class:`~segflowd.flows.wheel.TimerWheel`, the rest only
in the store until the loader brings them in.
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import sqlalchemy as sa
import structlog
from anyio.abc import TaskStatus
from sqlalchemy.exc import IntegrityError

from ..app import CampaignDef
from ..errors import FlowError
from ..hooks import ConditionRunner, IngestBatch, MembershipChange, OutboxWaker, StoredEvent
from ..http import Router
from ..kernel import Kernel
from ..schema import campaign_settings, flow_instances, segment_changes, segment_members
from ..store import is_unavailable
from .steps import Stepper
from .versions import reconcile_versions, record_versions
from .wheel import TimerWheel, WheelStatistics
from .work import (
    BATCH,
    CATCH_UP_CHANGES,
    HORIZON,
    LATENESS_WINDOW,
    LOAD_CHUNK,
    LOAD_RETRY,
    MEMBERSHIP_CHUNK,
    RESYNC_RETRY,
    STATS_REFRESH,
    WORKERS,
    FlowStatistics,
    Work,
)

__all__ = ["FlowService", "FlowStatistics"]

log = structlog.get_logger("segflowd.flows")

_EPOCH = dt.datetime(1970, 1, 1)
_ACTIVE = ("running", "waiting")


def _secs(t: dt.datetime) -> float:
    return (t - _EPOCH).total_seconds()


class FlowService:
    """Runs every campaign instance. Implements MembershipSink and IngestSink."""

    name = "flows"

    def __init__(self, k: Kernel, *, wakers: Sequence[OutboxWaker] = (),
                 conditions: ConditionRunner | None = None, horizon: float = HORIZON,
                 workers: int = WORKERS) -> None:
        self.k = k
        self.wakers = wakers
        self.conditions = conditions
        self.horizon = horizon
        self.workers = workers
        self.wheel = TimerWheel(_secs(k.clock.now()))
        self.paused: set[str] = set()
        self.awaited: set[str] = set()  # event names wait_for_event has waited on
        self._ready: collections.deque[Work] = collections.deque()
        self._work = anyio.Event()
        self._kick = anyio.Event()
        self._busy: set[int] = set()
        self._deferred: dict[int, list[Work]] = {}
        self._active_batches = 0
        self._loaded_until: dt.datetime | None = None  # every wait before this is in the wheel
        self._far_min: dt.datetime | None = None  # earliest wait not yet in the wheel
        self._loading_until: dt.datetime | None = None  # the bound of a load in progress
        self._far_pending: dt.datetime | None = None  # far waits added during that load
        self._far = 0
        self._sleep_target = float("inf")
        self._lateness: collections.deque[float] = collections.deque(maxlen=LATENESS_WINDOW)
        self._fired = 0
        self._steps = 0
        self._step_times: collections.deque[tuple[float, int]] = collections.deque(maxlen=120)
        self._failures = 0
        self._diverged = 0
        self._counts: tuple[tuple[str, str, int], ...] = ()
        self._started = False
        self._event_batches: collections.deque[list[StoredEvent]] = collections.deque()
        self._idle_waiters: list[anyio.Event] = []
        self._ticking = False
        self._resyncing = False  # a resync is querying the store for dropped work
        self._resync = anyio.Event()  # set when a store outage may have dropped work
        self._held: list[MembershipChange] = []  # entries and exits the store refused
        self._held_wakes: list[Work] = []  # event wakes whose step the store refused
        # While catching up at start: (campaign, user) -> their newest instance's start,
        # and the (campaign, user) pairs with a live instance.
        self._started_since: dict[tuple[str, str], dt.datetime] | None = None
        self._live_pairs: set[tuple[str, str]] = set()
        self._stepper = Stepper(self)
        k.stats["flows"] = self.statistics
        k.stats["wheel"] = self.wheel_statistics
        k.actions["campaign.pause"] = self._act_pause
        k.actions["campaign.resume"] = self._act_resume
        k.actions["instance.terminate"] = self._act_terminate
        k.actions["instance.restart"] = self._act_restart
        m = k.metrics
        m.describe("segflow_flow_steps_total", "counter", "flow steps committed")
        m.describe("segflow_flow_failures_total", "counter", "flow instances failed")
        m.describe("segflow_flow_diverged_total", "counter", "flow instances marked diverged")
        m.describe("segflow_wheel_timers", "gauge", "waits in the timer wheel (near) and store")
        m.collect(lambda: [
            ("segflow_wheel_timers", {"where": "near"}, float(len(self.wheel))),
            ("segflow_wheel_timers", {"where": "far"}, float(self._far)),
        ])

    # -- lifecycle -------------------------------------------------------------------

    def register_routes(self, router: Router) -> None:
        return None

    async def startup(self) -> None:
        """Versions, paused campaigns, the wheel rebuilt from the store, interrupted steps.

        The independent reads run side by side, each on its own connection, so a start
        with a million waiting instances costs its slowest read, not their sum.
        """
        now = self.k.clock.now()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._reconcile, now)
            tg.start_soon(self._read_state)
            tg.start_soon(self._count_far)
            tg.start_soon(self._recount)
        self.wheel = TimerWheel(_secs(now))
        self._loaded_until = None
        await self._load(now)
        await self._catch_up_membership()
        self._started = True

    async def _reconcile(self, now: dt.datetime) -> None:
        store, app = self.k.store, self.k.app
        await record_versions(store, app, now)
        for report in await reconcile_versions(store, app, now, apply=True):
            for inst, reason in report.diverged_instances:
                self._diverged += 1
                self.k.metrics.inc("segflow_flow_diverged_total", campaign=report.campaign)
                log.warning("flow.diverged", campaign=report.campaign, instance=inst,
                            reason=reason)
                self.k.bus.publish("flow.diverged", campaign=report.campaign, instance=inst,
                                   reason=reason)
            if report.moved:
                log.info("flow.versions_moved", campaign=report.campaign,
                         moved=report.moved, version=report.version)

    async def _read_state(self) -> None:
        """Paused campaigns, interrupted steps, and the events waits are waiting for."""
        fi = flow_instances.c
        async with self.k.store.connect() as conn:
            rows = await conn.execute(sa.select(campaign_settings.c.campaign)
                                      .where(campaign_settings.c.paused.is_(True)))
            self.paused = {r[0] for r in rows}
            for (iid,) in await conn.execute(self._running_query()):
                self._push(Work(int(iid), "run"))
            self.awaited |= {str(r[0]) for r in await conn.execute(
                sa.select(fi.wait_event).distinct().where(fi.wait_event.is_not(None)))}

    def _running_query(self, campaign: str | None = None) -> sa.Select[Any]:
        """Instances left ``running`` (a step was interrupted). Campaigns no longer in the
        app are left out: they could not step anyway; naming the campaigns lets the store
        use ``(campaign, status)`` instead of reading every instance."""
        fi = flow_instances.c
        names = [campaign] if campaign is not None else sorted(self.k.app.campaigns)
        return sa.select(fi.id).where(fi.campaign.in_(names), fi.status == "running",
                                      fi.live == 1)

    async def _count_far(self) -> None:
        async with self.k.store.connect() as conn:
            self._far = int((await conn.execute(sa.select(sa.func.count()).where(
                flow_instances.c.wake_at.is_not(None)))).scalar() or 0)

    async def _catch_up_membership(self) -> None:
        """Hand over again the newest segment changes: the segment engine commits a change
        before it tells flows, so a crash in between left an entry without its instance.
        Replaying is safe: an entry is skipped where the campaign has an instance for the
        user started at or after it, and an exit only ends what should have ended."""
        watched = {s for c in self.k.app.campaigns.values() for s in (*c.segments, *c.exclude)}
        if not watched:
            return
        sc, fi = segment_changes.c, flow_instances.c
        async with self.k.store.connect() as conn:
            top = int((await conn.execute(sa.select(sa.func.max(sc.id)))).scalar() or 0)
            rows = (await conn.execute(
                sa.select(sc.segment, sc.user_id, sc.entered, sc.at).where(
                    sc.id > top - CATCH_UP_CHANGES, sc.segment.in_(watched))
                .order_by(sc.id))).all()
            if not rows:
                return
            since = min(r.at for r in rows)
            uids = sorted({str(r.user_id) for r in rows})
            started: dict[tuple[str, str], dt.datetime] = {}
            live: set[tuple[str, str]] = set()
            for lo in range(0, len(uids), MEMBERSHIP_CHUNK):
                part = uids[lo:lo + MEMBERSHIP_CHUNK]
                for c, u, t in await conn.execute(
                        sa.select(fi.campaign, fi.user_id, sa.func.max(fi.created_at)).where(
                            fi.user_id.in_(part), fi.created_at >= since)
                        .group_by(fi.campaign, fi.user_id)):
                    started[(str(c), str(u))] = t
                live.update((str(c), str(u)) for c, u in await conn.execute(
                    sa.select(fi.campaign, fi.user_id).where(fi.user_id.in_(part),
                                                             fi.live == 1)))
        self._started_since, self._live_pairs = started, live
        try:
            await self._apply_membership([MembershipChange(
                str(r.segment), str(r.user_id), bool(r.entered), r.at) for r in rows])
        finally:
            self._started_since, self._live_pairs = None, set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.startup()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._ticker)
            for _ in range(self.workers):
                tg.start_soon(self._worker)
            tg.start_soon(self._recounter)
            tg.start_soon(self._resyncer)
            task_status.started()

    async def drain(self) -> None:
        """Let in-flight steps finish; queued work stays in the store for the next start."""
        self._ready.clear()
        await self._until_idle()

    async def settle(self, limit: float = 30.0) -> None:
        """Wait until no work is queued or running (tests and benchmarks)."""
        with anyio.fail_after(limit):
            await self._until_idle()

    def _is_idle(self) -> bool:
        return not (self._ready or self._busy or self._active_batches or self._ticking
                    or self._resyncing)

    async def _until_idle(self) -> None:
        while not self._is_idle():
            ev = anyio.Event()
            self._idle_waiters.append(ev)
            await ev.wait()

    def _notify_idle(self) -> None:
        if self._is_idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for ev in waiters:
                ev.set()

    def next_due(self) -> dt.datetime | None:
        """When the service next has something to do by the clock (tests step time to it)."""
        # next_fire, not next_due: sleeping only until a deadline inside the current tick
        # would wake to nothing, again and again, until the tick passed (a busy loop that
        # starved the workers of the event loop)
        cands = [t for t in (self.wheel.next_fire(),) if t is not None]
        if self._far_min is not None:
            cands.append(_secs(self._far_min) - self.horizon / 2)
        if not cands:
            return None
        return _EPOCH + dt.timedelta(seconds=min(cands))

    # -- the timer wheel -------------------------------------------------------------

    async def _ticker(self) -> None:
        while True:
            now = self.k.clock.now()
            self._fire(now)
            stale = (self._loaded_until is not None
                     and (self._loaded_until - now).total_seconds() < self.horizon / 2)
            if stale or (self._far_min is not None
                         and _secs(self._far_min) - _secs(now) < self.horizon):
                try:
                    await self._load(now)  # also a safety net: at least every horizon / 2
                    continue
                except Exception as exc:  # the store is down: the waits are safe in it
                    self._loading_until = None
                    log.warning("wheel.load_failed", error=str(exc)[:300])
                    await self.k.clock.sleep(LOAD_RETRY)
                    continue
            target = self.next_due()
            delay = self.horizon / 2 if target is None else (target - now).total_seconds()
            delay = max(0.0, min(delay, self.horizon / 2))
            self._sleep_target = _secs(now) + delay
            self._kick = anyio.Event()
            self._ticking = False
            self._notify_idle()
            await self._sleep_or_kick(delay)
            self._ticking = True
            self._sleep_target = float("inf")

    async def _sleep_or_kick(self, delay: float) -> None:
        async with anyio.create_task_group() as tg:
            async def sleeper() -> None:
                await self.k.clock.sleep(delay)
                tg.cancel_scope.cancel()

            async def kicked() -> None:
                await self._kick.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(sleeper)
            tg.start_soon(kicked)

    def _fire(self, now: dt.datetime) -> None:
        nows = _secs(now)
        for key, deadline in self.wheel.advance(nows):
            self._fired += 1
            self._lateness.append(max(0.0, nows - deadline))
            self._push(Work(int(key), "timer"))  # type: ignore[call-overload]  # keys are ints

    def schedule(self, instance: int, wake_at: dt.datetime) -> None:
        # While the loader runs, its new bound already counts: a wait committed after
        # its query but before it finishes must not fall between the two.
        limit = max((t for t in (self._loaded_until, self._loading_until) if t is not None),
                    default=None)
        if limit is not None and wake_at < limit:
            self.wheel.add(instance, _secs(wake_at))
            if _secs(wake_at) < self._sleep_target:
                self._kick.set()
        else:
            self._far += 1
            if self._far_min is None or wake_at < self._far_min:
                self._far_min = wake_at
                self._kick.set()
            if self._loading_until is not None and (
                    self._far_pending is None or wake_at < self._far_pending):
                self._far_pending = wake_at

    async def _load(self, now: dt.datetime) -> None:
        """Move the waits due before ``now + horizon`` from the store into the wheel."""
        until = now + dt.timedelta(seconds=self.horizon)
        self._loading_until = until
        fi = flow_instances.c
        after: tuple[dt.datetime, int] | None = None
        # With no campaign paused, id and wake_at are all it needs: the wake_at index holds
        # both, so the store reads no rows (a paused campaign's waits are skipped here)
        cols = (fi.id, fi.wake_at, fi.campaign) if self.paused else (fi.id, fi.wake_at)
        async with self.k.store.connect() as conn:
            while True:
                q = sa.select(*cols).where(fi.wake_at.is_not(None), fi.wake_at < until)
                if self._loaded_until is not None:
                    q = q.where(fi.wake_at >= self._loaded_until)
                if after is not None:
                    q = q.where(sa.or_(fi.wake_at > after[0],
                                       sa.and_(fi.wake_at == after[0], fi.id > after[1])))
                rows = (await conn.execute(q.order_by(fi.wake_at, fi.id).limit(LOAD_CHUNK))
                        ).all()
                for row in rows:
                    if len(row) < 3 or row[2] not in self.paused:
                        self.wheel.add(int(row[0]), _secs(row[1]))
                    self._far = max(0, self._far - 1)
                if len(rows) < LOAD_CHUNK:
                    break
                after = (rows[-1][1], int(rows[-1][0]))
                if self._started:  # a long load must not hold back the waits already due
                    self._fire(self.k.clock.now())
                await anyio.lowlevel.checkpoint()
            self._loaded_until = until
            found = (await conn.execute(sa.select(sa.func.min(fi.wake_at)).where(
                fi.wake_at >= until))).scalar()
        # a far wait committed while this load ran may be newer than the MIN above
        pending, self._far_pending, self._loading_until = self._far_pending, None, None
        self._far_min = min((t for t in (found, pending) if t is not None), default=None)

    # -- work queue ------------------------------------------------------------------

    def _push(self, work: Work) -> None:
        self._ready.append(work)
        self._work.set()

    async def _worker(self) -> None:
        while True:
            while not self._ready:
                if self._work.is_set():
                    self._work = anyio.Event()
                await self._work.wait()
            batch: list[Work] = []
            while self._ready and len(batch) < BATCH:
                w = self._ready.popleft()
                if w.instance in self._busy:
                    self._deferred.setdefault(w.instance, []).append(w)
                    continue
                self._busy.add(w.instance)
                batch.append(w)
            self._active_batches += 1
            try:
                if any(w.kind == "event" and w.instance < 0 for w in batch):
                    await self._guarded(self._match_events())
                steps = [w for w in batch if w.instance >= 0]
                if steps and not await self._guarded(self._stepper.run_batch(steps)):
                    # Timers and runs are found again in the store after an outage; an
                    # event's wake is not (the event is long committed): keep it.
                    self._held_wakes.extend(w for w in steps if w.kind == "event")
            finally:
                for w in batch:
                    self._busy.discard(w.instance)
                    for d in self._deferred.pop(w.instance, ()):
                        self._push(d)
                self._active_batches -= 1
                self._notify_idle()
            await anyio.lowlevel.checkpoint()  # a burst of due steps must not starve ingest

    async def _guarded(self, work: Awaitable[None]) -> bool:
        """Run ``work``; False if the store was unavailable (the outage is noted)."""
        try:
            await work
        except Exception as exc:  # a store outage must not kill the worker; work stays durable
            if is_unavailable(exc):
                self._store_failed(exc)
                return False
            log.error("flow.step_error", error=str(exc), exc_info=True)
        return True

    # -- after a store outage --------------------------------------------------------

    def _store_failed(self, exc: BaseException) -> None:
        """Work failed because the store is down: it is durable there; resync later."""
        log.warning("flow.store_unavailable", error=str(exc)[:300], retry_in_s=RESYNC_RETRY)
        self._resync.set()

    async def _resyncer(self) -> None:
        """Once the store answers again, re-queue what an outage dropped: instances left
        ``running``, waits already due (the wheel fired them into a failed step), event
        wakes whose step failed, events not yet matched to their waits, and the entries
        and exits that could not be applied. Re-queued work that was in fact done finds
        its instance moved on (an event wake: its seq) and changes nothing."""
        while True:
            await self._resync.wait()
            await self.k.clock.sleep(RESYNC_RETRY)
            self._resync = anyio.Event()
            self._resyncing = True  # not idle until what it finds is queued
            try:
                await self._resync_once()
            finally:
                self._resyncing = False
                self._notify_idle()

    async def _resync_once(self) -> None:
        held, self._held = self._held, []
        fi = flow_instances.c
        try:
            if held:
                await self._apply_membership(held)
            async with self.k.store.connect() as conn:
                running = [int(i) for (i,) in await conn.execute(self._running_query())]
                due = [(int(i), str(c)) for i, c in await conn.execute(
                    sa.select(fi.id, fi.campaign).where(
                        fi.live == 1, fi.status == "waiting", fi.wake_at.is_not(None),
                        fi.wake_at <= self.k.clock.now()))]
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self._store_failed(exc)
            return
        wakes, self._held_wakes = self._held_wakes, []
        log.info("flow.resynced", running=len(running), due=len(due), entries=len(held),
                 event_wakes=len(wakes), event_batches=len(self._event_batches))
        for w in wakes:
            self._push(w)
        if self._event_batches:
            self._push(Work(-1, "event"))
        for iid in running:
            self._push(Work(iid, "run"))
        for iid, campaign in due:
            if campaign not in self.paused:
                self._push(Work(iid, "timer"))

    # -- entries and exits -----------------------------------------------------------

    async def membership_changed(self, changes: Sequence[MembershipChange]) -> None:
        """Start instances whose campaign now holds; end dynamic ones that no longer do.

        While the store is down the changes are held and applied once it is back.
        """
        await self._apply_membership(changes)

    async def _apply_membership(self, changes: Sequence[MembershipChange]) -> None:
        by_user: dict[str, list[MembershipChange]] = {}
        for ch in changes:
            by_user.setdefault(ch.user_id, []).append(ch)
        campaigns = list(self.k.app.campaigns.values())
        watched = {s for c in campaigns for s in (*c.segments, *c.exclude)}
        todo = [u for u, chs in by_user.items() if any(ch.segment in watched for ch in chs)]
        done: set[str] = set()
        try:
            for lo in range(0, len(todo), MEMBERSHIP_CHUNK):
                chunk = todo[lo:lo + MEMBERSHIP_CHUNK]
                mine: dict[str, set[str]] = {u: set() for u in chunk}
                async with self.k.store.connect() as conn:
                    for seg, uid in await conn.execute(
                            sa.select(segment_members.c.segment, segment_members.c.user_id)
                            .where(segment_members.c.user_id.in_(chunk),
                                   segment_members.c.segment.in_(watched))):
                        mine[str(uid)].add(str(seg))
                for user_id in chunk:
                    await self._membership(user_id, by_user[user_id], mine[user_id],
                                           campaigns)
                    done.add(user_id)
        except Exception as exc:
            if not is_unavailable(exc) or self._started_since is not None:
                raise  # (at start, as any store failure there)
            # The membership is committed; only its effect on flows is missing. Applied
            # again later, an entry already made finds its instance and does nothing.
            self._held.extend(ch for u in todo if u not in done for ch in by_user[u])
            self._store_failed(exc)

    async def _membership(self, user_id: str, chs: list[MembershipChange], mine: set[str],
                          campaigns: list[CampaignDef]) -> None:
        touched = {c.segment for c in chs}
        for c in campaigns:
            if not touched & {*c.segments, *c.exclude}:
                continue
            holds = set(c.segments) <= mine and not (set(c.exclude) & mine)
            entering = any((ch.entered and ch.segment in c.segments)
                           or (not ch.entered and ch.segment in c.exclude) for ch in chs)
            if holds and entering:
                if self._started_since is not None:  # catching up: was it entered since?
                    latest = max(ch.at for ch in chs if (ch.entered and ch.segment in c.segments)
                                 or (not ch.entered and ch.segment in c.exclude))
                    last_start = self._started_since.get((c.name, user_id))
                    if last_start is not None and last_start >= latest:
                        continue
                event_id = next((ch.event_id for ch in reversed(chs)
                                 if ch.event_id is not None), None)
                await self.enter(c, user_id, event_id)
            elif not holds and c.behavior == "dynamic" and (
                    self._started_since is None or (c.name, user_id) in self._live_pairs):
                await self.exit_user(c.name, user_id)

    async def enter(self, c: CampaignDef, user_id: str, event_id: int | None = None
                    ) -> int | None:
        """Start an instance of ``c`` for the user; None when it may not (or already runs)."""
        if c.name in self.paused:
            return None
        now = self.k.clock.now()
        fi = flow_instances.c
        try:
            async with self.k.store.begin() as conn:
                if c.behavior == "static" and not c.reentry:
                    seen = (await conn.execute(sa.select(fi.id).where(
                        fi.campaign == c.name, fi.user_id == user_id).limit(1))).first()
                    if seen is not None:
                        return None
                res = await conn.execute(sa.insert(flow_instances).values(
                    campaign=c.name, user_id=user_id, version=c.version, status="running",
                    live=1, seq=0, entry_event_id=event_id, created_at=now, updated_at=now))
                iid = int(res.inserted_primary_key[0])  # type: ignore[index]  # always set
        except IntegrityError:
            return None  # a live instance exists: the store said so
        log.info("flow.started", campaign=c.name, user_id=user_id, instance=iid)
        self.k.bus.publish("flow.started", campaign=c.name, user_id=user_id, instance=iid)
        self._push(Work(iid, "run"))
        return iid

    async def start_flow(self, campaign: str, user_id: str, *, key: str,
                         data: Mapping[str, object]) -> bool:
        """Start ``campaign`` for the user outside segment entry (a broadcast), once per
        ``key``; ``data`` becomes ``ctx.data``. False when nothing was started: the key was
        used before, the user has a live instance, or the campaign is paused.
        """
        c = self.k.app.campaigns.get(campaign)
        if c is None:
            raise FlowError(f"no campaign {campaign!r}")
        if campaign in self.paused:
            return False
        now = self.k.clock.now()
        try:
            async with self.k.store.begin() as conn:
                res = await conn.execute(sa.insert(flow_instances).values(
                    campaign=c.name, user_id=user_id, version=c.version, status="running",
                    live=1, seq=0, start_key=key, start_data=dict(data), created_at=now,
                    updated_at=now))
                iid = int(res.inserted_primary_key[0])  # type: ignore[index]  # always set
        except IntegrityError:
            return False  # the key was used, or a live instance exists: the store said so
        log.info("flow.started", campaign=c.name, user_id=user_id, instance=iid, key=key)
        self.k.bus.publish("flow.started", campaign=c.name, user_id=user_id, instance=iid)
        self._push(Work(iid, "run"))
        return True

    async def exit_user(self, campaign: str, user_id: str) -> int | None:
        """End the user's live instance of ``campaign`` (dynamic exit); its id, if any."""
        fi = flow_instances.c
        now = self.k.clock.now()
        async with self.k.store.begin() as conn:
            row = (await conn.execute(sa.select(fi.id, fi.wake_at).where(
                fi.campaign == campaign, fi.user_id == user_id, fi.live == 1,
                fi.status.in_(_ACTIVE)))).first()
            if row is None:
                return None
            await conn.execute(sa.update(flow_instances).where(fi.id == row[0]).values(
                status="exited", live=None, wake_at=None, wait_event=None, ended_at=now,
                updated_at=now))
        iid = int(row[0])
        self._cancel_timer(iid, row[1])
        log.info("flow.exited", campaign=campaign, user_id=user_id, instance=iid)
        self.k.bus.publish("flow.exited", campaign=campaign, user_id=user_id, instance=iid,
                           reason="left segment")
        return iid

    def cancel_timer(self, instance: int) -> None:
        """Take an instance's wait out of the wheel (its step supersedes the wake)."""
        self.wheel.cancel(instance)

    def _cancel_timer(self, iid: int, wake_at: dt.datetime | None) -> None:
        if not self.wheel.cancel(iid) and wake_at is not None:
            self._far = max(0, self._far - 1)

    # -- wait_for_event --------------------------------------------------------------

    def ingested(self, batch: IngestBatch) -> None:
        """Queue the batch's events for instances waiting on them (matched in a task)."""
        # only names some instance waits for (kept from the store at start, then here)
        evs = [e for e in batch.events if e.user_id is not None and e.name in self.awaited]
        if evs:
            self._event_batches.append(evs)
            self._push(Work(-1, "event"))

    async def _match_events(self) -> None:
        """Wake instances waiting for the events of each batch: one query per batch."""
        fi = flow_instances.c
        while self._event_batches:
            queued = self._event_batches.popleft()
            batch = [e for e in queued if e.user_id is not None]
            if not batch:
                continue
            waiting: dict[tuple[str, str], list[tuple[int, int]]] = {}
            try:
                async with self.k.store.connect() as conn:
                    for iid, uid, name, seq in await conn.execute(
                            sa.select(fi.id, fi.user_id, fi.wait_event, fi.seq).where(
                                fi.user_id.in_({e.user_id for e in batch}),
                                fi.wait_event.in_({e.name for e in batch}),
                                fi.status == "waiting")):
                        waiting.setdefault((str(uid), str(name)), []).append(
                            (int(iid), int(seq)))
            except BaseException:
                # Not matched (the store is down, or shutdown): back at the head of the
                # queue, for the resync to match again.
                self._event_batches.appendleft(queued)
                raise
            for e in batch:
                for iid, seq in waiting.get((str(e.user_id), e.name), ()):
                    data: dict[str, object] = {
                        "id": e.id, "name": e.name, "attributes": dict(e.attributes),
                        "created_at": e.created_at.isoformat()}
                    self._push(Work(iid, "event", data, e.name, seq))

    # -- stepping (see steps.py) -----------------------------------------------------

    def ended(self, iid: int, campaign: str, user_id: str, status: str,
              error: str | None) -> None:
        """An instance ended (completed, failed) or was marked diverged: report it."""
        self.wheel.cancel(iid)
        if status == "diverged":
            self._diverged += 1
            self.k.metrics.inc("segflow_flow_diverged_total", campaign=campaign)
            log.warning("flow.diverged", campaign=campaign, user_id=user_id, instance=iid,
                        reason=error)
        elif status == "failed":
            self._failures += 1
            self.k.metrics.inc("segflow_flow_failures_total", campaign=campaign)
            log.error("flow.failed", campaign=campaign, user_id=user_id, instance=iid,
                      error=error)
        else:
            log.info("flow.completed", campaign=campaign, user_id=user_id, instance=iid)
        extra = {"error": error.strip().splitlines()[-1]} if error else {}
        self.k.bus.publish(f"flow.{status}", campaign=campaign, user_id=user_id,
                           instance=iid, **extra)

    def count_steps(self, n: int) -> None:
        self._steps += n
        self.k.metrics.inc("segflow_flow_steps_total", n)
        sec = int(time.monotonic())
        if self._step_times and self._step_times[-1][0] == sec:
            self._step_times[-1] = (sec, self._step_times[-1][1] + n)
        else:
            self._step_times.append((sec, n))

    # -- statistics ------------------------------------------------------------------

    async def _recounter(self) -> None:
        while True:
            await anyio.sleep(STATS_REFRESH)
            try:
                await self._recount()
            except Exception as exc:
                log.warning("flow.recount_failed", error=str(exc))

    async def _recount(self) -> None:
        fi = flow_instances.c
        async with self.k.store.connect() as conn:
            rows = await conn.execute(sa.select(fi.campaign, fi.status, sa.func.count())
                                      .group_by(fi.campaign, fi.status))
            self._counts = tuple(sorted((str(a), str(b), int(n)) for a, b, n in rows))

    def statistics(self) -> FlowStatistics:
        now = int(time.monotonic())
        recent = [n for s, n in self._step_times if now - s < 60]
        span = min(60, max(1, now - self._step_times[0][0] + 1)) if self._step_times else 1
        return FlowStatistics(
            instances=self._counts, steps=self._steps,
            steps_per_second=sum(recent) / span, failures=self._failures,
            diverged=self._diverged, paused=tuple(sorted(self.paused)),
            queued=len(self._ready))

    def wheel_statistics(self) -> WheelStatistics:
        lat = sorted(self._lateness)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0
        return WheelStatistics(size=len(self.wheel) + self._far, near=len(self.wheel),
                               far=self._far, levels=self.wheel.counts(), fired=self._fired,
                               lateness_p99=p99)

    # -- actions ---------------------------------------------------------------------

    def _campaign_arg(self, args: Mapping[str, object]) -> str:
        name = args.get("campaign")
        if not isinstance(name, str) or name not in self.k.app.campaigns:
            raise FlowError(f"no campaign {name!r}; campaigns: "
                            f"{', '.join(sorted(self.k.app.campaigns)) or '(none)'}")
        return name

    async def _set_paused(self, name: str, paused: bool) -> None:
        now = self.k.clock.now()
        async with self.k.store.begin() as conn:
            res = await conn.execute(sa.update(campaign_settings).where(
                campaign_settings.c.campaign == name).values(paused=paused, updated_at=now))
            if res.rowcount == 0:
                await conn.execute(sa.insert(campaign_settings).values(
                    campaign=name, paused=paused, updated_at=now))

    async def _act_pause(self, args: Mapping[str, object]) -> object:
        """campaign.pause {"campaign"}: no new entries, no steps; waits are kept."""
        name = self._campaign_arg(args)
        await self._set_paused(name, True)
        self.paused.add(name)
        log.info("campaign.paused", campaign=name)
        self.k.bus.publish("campaign.paused", campaign=name)
        return {"campaign": name, "paused": True}

    async def _act_resume(self, args: Mapping[str, object]) -> object:
        """campaign.resume {"campaign"}: steps run again; waits due meanwhile fire now."""
        name = self._campaign_arg(args)
        await self._set_paused(name, False)
        self.paused.discard(name)
        fi = flow_instances.c
        async with self.k.store.connect() as conn:
            if self._loaded_until is not None:
                rows = await conn.execute(sa.select(fi.id, fi.wake_at).where(
                    fi.campaign == name, fi.wake_at.is_not(None),
                    fi.wake_at < self._loaded_until))
                for iid, wake_at in rows:
                    self.wheel.add(int(iid), _secs(wake_at))
            for (iid,) in await conn.execute(self._running_query(name)):
                self._push(Work(int(iid), "run"))
        self._kick.set()
        log.info("campaign.resumed", campaign=name)
        self.k.bus.publish("campaign.resumed", campaign=name)
        return {"campaign": name, "paused": False}

    async def _instance_arg(self, args: Mapping[str, object]) -> Any:
        raw = args.get("instance")
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise FlowError(f"instance must be an instance id, not {raw!r}")
        try:
            iid = int(raw)
        except ValueError:
            raise FlowError(f"instance must be an instance id, not {raw!r}") from None
        async with self.k.store.connect() as conn:
            row = (await conn.execute(sa.select(flow_instances).where(
                flow_instances.c.id == iid))).first()
        if row is None:
            raise FlowError(f"no flow instance {iid}")
        return row

    async def _act_terminate(self, args: Mapping[str, object]) -> object:
        """instance.terminate {"instance"}: end it for good (diverged, failed or live)."""
        inst = await self._instance_arg(args)
        now = self.k.clock.now()
        if inst.status in ("completed", "exited", "terminated"):
            raise FlowError(f"instance {inst.id} already ended ({inst.status})")
        async with self.k.store.begin() as conn:
            await conn.execute(sa.update(flow_instances).where(
                flow_instances.c.id == inst.id).values(
                status="terminated", live=None, wake_at=None, wait_event=None,
                ended_at=now, updated_at=now))
        self._cancel_timer(int(inst.id), inst.wake_at)
        log.info("flow.terminated", campaign=inst.campaign, instance=inst.id)
        self.k.bus.publish("flow.terminated", campaign=inst.campaign, user_id=inst.user_id,
                           instance=inst.id)
        return {"instance": inst.id, "status": "terminated"}

    async def _act_restart(self, args: Mapping[str, object]) -> object:
        """instance.restart {"instance"}: a diverged or failed instance starts over, on the
        current version, as a new instance."""
        inst = await self._instance_arg(args)
        if inst.status not in ("diverged", "failed"):
            raise FlowError(f"instance {inst.id} is {inst.status}: only diverged or failed "
                            "instances can be restarted")
        c = self.k.app.campaigns.get(inst.campaign)
        if c is None:
            raise FlowError(f"campaign {inst.campaign!r} is no longer in the app")
        now = self.k.clock.now()
        fi = flow_instances.c
        try:
            async with self.k.store.begin() as conn:
                await conn.execute(sa.update(flow_instances).where(fi.id == inst.id).values(
                    status="terminated" if inst.status == "diverged" else inst.status,
                    live=None, ended_at=inst.ended_at or now, updated_at=now))
                res = await conn.execute(sa.insert(flow_instances).values(
                    campaign=c.name, user_id=inst.user_id, version=c.version,
                    status="running", live=1, seq=0, entry_event_id=inst.entry_event_id,
                    start_data=inst.start_data, created_at=now, updated_at=now))
                new = int(res.inserted_primary_key[0])  # type: ignore[index]  # always set
        except IntegrityError:
            raise FlowError(f"user {inst.user_id!r} already has a live instance of "
                            f"{c.name!r}") from None
        log.info("flow.restarted", campaign=c.name, instance=inst.id, new_instance=new)
        self.k.bus.publish("flow.started", campaign=c.name, user_id=inst.user_id,
                           instance=new, restarted_from=inst.id)
        self._push(Work(new, "run"))
        return {"instance": new, "restarted_from": inst.id}
