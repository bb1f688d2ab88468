"""The wheel half of the flow service: waits due within the horizon sit in the in-memory
:class:`~segflowd.flows.wheel.TimerWheel`; the rest stay in the store until the loader brings
them in as the horizon advances. The ticker fires due waits into the work queue.

A mixin of :class:`~segflowd.flows.service.FlowService`, which owns the state it reads.
"""

from __future__ import annotations

import collections
import datetime as dt
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import sqlalchemy as sa
import structlog

from ..metrics import Histogram
from ..schema import flow_instances
from .wheel import TimerWheel, WheelStatistics
from .work import CLOCK_STEP_TOLERANCE, EPOCH, LOAD_CHUNK, LOAD_RETRY, Work, secs

if TYPE_CHECKING:
    from ..kernel import Kernel

__all__ = ["Timers"]

log = structlog.get_logger("segflowd.flows")


class Timers:
    """Schedules, loads and fires waits; see the module docstring."""

    k: Kernel
    wheel: TimerWheel
    horizon: float
    paused: set[str]
    _loaded_until: dt.datetime | None  # every wait before this is in the wheel
    _far_min: dt.datetime | None  # earliest wait not yet in the wheel
    _loading_until: dt.datetime | None  # the bound of a load in progress
    _far_pending: dt.datetime | None  # far waits added during that load
    _far: int
    _sleep_target: float
    _kick: anyio.Event
    _ticking: bool
    _started: bool
    _lateness: collections.deque[float]
    _lateness_seconds: Histogram  # the same lateness, for /metrics
    _fired: int

    if TYPE_CHECKING:
        def _push(self, work: Work) -> None: ...

        async def _count_far(self) -> None: ...

        def _notify_idle(self) -> None: ...

    def next_due(self) -> dt.datetime | None:
        """When the service next has something to do by the clock (tests step time to it)."""
        # next_fire, not next_due: sleeping only until a deadline inside the current tick
        # would wake to nothing, again and again, until the tick passed (a busy loop that
        # starved the workers of the event loop)
        cands = [t for t in (self.wheel.next_fire(),) if t is not None]
        if self._far_min is not None:
            cands.append(secs(self._far_min) - self.horizon / 2)
        if not cands:
            return None
        return EPOCH + dt.timedelta(seconds=min(cands))

    async def _ticker(self) -> None:
        while True:
            now = self.k.clock.now()
            if secs(now) < self.wheel.now - CLOCK_STEP_TOLERANCE:
                try:
                    await self._rewind(now)
                except Exception as exc:  # the store is down: the waits are safe in it
                    log.warning("wheel.load_failed", error=str(exc)[:300])
                    await self.k.clock.sleep(LOAD_RETRY)
                    continue
            self._fire(now)
            stale = (self._loaded_until is not None
                     and (self._loaded_until - now).total_seconds() < self.horizon / 2)
            if stale or (self._far_min is not None
                         and secs(self._far_min) - secs(now) < self.horizon):
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
            self._sleep_target = secs(now) + delay
            self._kick = anyio.Event()
            self._ticking = False
            self._notify_idle()
            await self._sleep_or_kick(delay)
            self._ticking = True
            self._sleep_target = float("inf")

    async def _rewind(self, now: dt.datetime) -> None:
        """The wall clock stepped back past the wheel: a wheel never moves back, so it is
        rebuilt at ``now`` from the store, where every wait is. Without this, each wait
        would fire at once and be found early (its wake_at is still ahead)."""
        log.warning("wheel.clock_stepped_back", by_s=round(self.wheel.now - secs(now), 3))
        old = (self.wheel, self._loaded_until, self._far_min)
        self.wheel = TimerWheel(secs(now))
        self._loaded_until = None
        self._far_min = None
        try:
            await self._count_far()
            await self._load(now)
        except BaseException:
            # The store failed mid-way: back to the old wheel, so the next tick finds the
            # clock behind it and rewinds again (an empty wheel with no bounds would
            # never load another wait).
            self.wheel, self._loaded_until, self._far_min = old
            raise

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
        nows = secs(now)
        for key, deadline in self.wheel.advance(nows):
            self._fired += 1
            late = max(0.0, nows - deadline)
            self._lateness.append(late)
            self._lateness_seconds.observe(late)
            self._push(Work(int(key), "timer"))  # type: ignore[call-overload]  # keys are ints

    def schedule(self, instance: int, wake_at: dt.datetime) -> None:
        # While the loader runs, its new bound already counts: a wait committed after
        # its query but before it finishes must not fall between the two.
        limit = max((t for t in (self._loaded_until, self._loading_until) if t is not None),
                    default=None)
        if limit is not None and wake_at < limit:
            self.wheel.add(instance, secs(wake_at))
            if secs(wake_at) < self._sleep_target:
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
                        self.wheel.add(int(row[0]), secs(row[1]))
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

    def cancel_timer(self, instance: int) -> None:
        """Take an instance's wait out of the wheel (its step supersedes the wake)."""
        self.wheel.cancel(instance)

    def _cancel_timer(self, iid: int, wake_at: dt.datetime | None) -> None:
        if not self.wheel.cancel(iid) and wake_at is not None:
            self._far = max(0, self._far - 1)

    def wheel_statistics(self) -> WheelStatistics:
        lat = sorted(self._lateness)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0
        return WheelStatistics(size=len(self.wheel) + self._far, near=len(self.wheel),
                               far=self._far, levels=self.wheel.counts(), fired=self._fired,
                               lateness_p99=p99)
