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
from collections.abc import Awaitable, Sequence
from typing import Any, Literal

import anyio
import anyio.lowlevel
import sqlalchemy as sa
import structlog
from anyio.abc import TaskStatus

from ..hooks import ConditionRunner, MembershipChange, OutboxWaker, StoredEvent
from ..http import Router
from ..kernel import Kernel
from ..metrics import LATENESS_BUCKETS
from ..schema import campaign_settings, flow_instances
from ..store import is_unavailable
from .admin import Admin
from .entries import Entries
from .held import Held
from .steps import Stepper
from .timers import Timers
from .versions import reconcile_versions, record_versions
from .wakes import Wakes
from .wheel import TimerWheel
from .work import (
    BATCH,
    HORIZON,
    LATENESS_WINDOW,
    RESYNC_RETRY,
    STATS_REFRESH,
    WORKERS,
    FlowStatistics,
    Work,
    secs,
)

__all__ = ["FlowService", "FlowStatistics"]

log = structlog.get_logger("segflowd.flows")

class FlowService(Timers, Wakes, Entries, Held, Admin):
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
        self.wheel = TimerWheel(secs(k.clock.now()))
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
        self._lateness_seconds = k.metrics.histogram(
            "segflow_flow_step_lateness_seconds",
            "how late a wait's step was fired after its due time, in seconds", LATENESS_BUCKETS)
        self._fired = 0
        self._steps = 0
        self._step_times: collections.deque[tuple[float, int]] = collections.deque(maxlen=120)
        self._failures = 0
        self._diverged = 0
        self._counts: tuple[tuple[str, str, int], ...] = ()
        self._started = False
        self._event_batches: collections.deque[tuple[int, list[StoredEvent]]] = (
            collections.deque())  # (first event id, the batch's awaited events)
        self._rechecks: list[tuple[list[int], int]] = []
        self._ev_seen = 0
        self._ev_pending: collections.Counter[int] = collections.Counter()
        self._ev_saved = 0
        self._match_failures = 0
        self._paused_wakes: dict[tuple[int, int], str] = {}
        self._release_on_resume: dict[str, list[int]] = {}
        self._ch_through = 0
        self._ch_frozen: int | None = None
        self._ch_saved = 0
        self._waiting: dict[str, int] = {}  # paused campaign -> entries held, as last counted
        self._swept_at: dict[str, dt.datetime] = {}  # see entries.py
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
        k.actions["instance.wake"] = self._act_wake
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
        self.wheel = TimerWheel(secs(now))
        self._loaded_until = None
        await self._load(now)
        await self._catch_up_membership()
        await self._finish_releases()  # resumes a crash cut short
        await self._count_waiting()
        await self._catch_up_events()
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

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.startup()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._ticker)
            for _ in range(self.workers):
                tg.start_soon(self._worker)
            tg.start_soon(self._recounter)
            tg.start_soon(self._resyncer)
            tg.start_soon(self._cursor_saver)
            task_status.started()

    async def drain(self) -> None:
        """Let in-flight steps finish; queued work stays in the store for the next start."""
        self._ready.clear()
        await self._until_idle()
        await self._final_cursor_save()  # as far as every stepped wake

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
                if (any(w.kind == "event" and w.instance < 0 for w in batch)
                        and await self._guarded(self._match_events()) == "error"):
                    self._match_failed()
                steps = [w for w in batch if w.instance >= 0]
                if steps:
                    await self._step(steps)
            finally:
                for w in batch:
                    self._busy.discard(w.instance)
                    for d in self._deferred.pop(w.instance, ()):
                        self._push(d)
                self._active_batches -= 1
                self._notify_idle()
            await anyio.lowlevel.checkpoint()  # a burst of due steps must not starve ingest

    async def _step(self, steps: list[Work]) -> None:
        """Step a batch; an event wake is released only once its step ran."""
        outcome = await self._guarded(self._stepper.run_batch(steps))
        if outcome == "error" and len(steps) > 1:
            # An error of the engine's own (a journal it cannot read, say) would take the
            # whole batch with it: each instance is tried alone, so only its own is lost.
            for w in steps:
                await self._step([w])
            return
        if outcome == "down":
            # Timers and runs are found again in the store after an outage; an event's
            # wake is not (the event is long committed): keep it.
            self._held_wakes.extend(w for w in steps if w.kind == "event")
            return
        # ok, or one instance's step failed for good (logged with its id): its wait is
        # left as it is, and its timeout (if it has one) still fires
        self.wakes_done(steps)

    async def _guarded(self, work: Awaitable[None]) -> Literal["ok", "down", "error"]:
        """Run ``work``; "down" if the store was unavailable (the outage is noted),
        "error" for any other failure (logged)."""
        try:
            await work
        except Exception as exc:  # a store outage must not kill the worker; work stays durable
            if is_unavailable(exc):
                self._store_failed(exc)
                return "down"
            log.error("flow.step_error", error=str(exc), exc_info=True)
            return "error"
        return "ok"

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
                self.changes_applied()
            await self._finish_releases()  # a resume the outage cut short
            now = self.k.clock.now()
            # Every wait the wheel should hold, not only those due: a step whose COMMIT
            # was reported failed may have applied, and its wait never reached the wheel.
            until = max(now, self._loaded_until or now)
            async with self.k.store.connect() as conn:
                running = [int(i) for (i,) in await conn.execute(self._running_query())]
                near = [(int(i), str(c), w) for i, c, w in await conn.execute(
                    sa.select(fi.id, fi.campaign, fi.wake_at).where(
                        fi.live == 1, fi.status == "waiting", fi.wake_at.is_not(None),
                        fi.wake_at < until))]
                far_min = (await conn.execute(sa.select(sa.func.min(fi.wake_at)).where(
                    fi.wake_at >= until))).scalar()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self._store_failed(exc)
            return
        wakes, self._held_wakes = self._held_wakes, []
        due = [(iid, c) for iid, c, w in near if w <= now]
        log.info("flow.resynced", running=len(running), due=len(due), entries=len(held),
                 event_wakes=len(wakes), event_batches=len(self._event_batches))
        for w in wakes:
            self._push(w)
        if self._event_batches or self._rechecks:
            self._push(Work(-1, "event"))
        for iid in running:
            self._push(Work(iid, "run"))
        for iid, campaign, wake_at in near:
            if campaign in self.paused:
                continue
            if wake_at <= now:
                self._push(Work(iid, "timer"))
            else:
                self.wheel.add(iid, secs(wake_at))  # (re)placed: add replaces
        if far_min is not None and (self._far_min is None or far_min < self._far_min):
            self._far_min = far_min  # the loader brings it in when the horizon reaches it
        self._kick.set()

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

    def start_run(self, instance: int) -> None:
        """Step a newly committed instance (continue_as_new)."""
        self._push(Work(instance, "run"))

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
                await self._count_waiting()
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
            queued=len(self._ready), waiting_entries=dict(self._waiting))

    # -- actions ---------------------------------------------------------------------
