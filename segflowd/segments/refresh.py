"""The segment engine's scheduled refresh: a segment recomputed whole and diffed against
``segment_members`` in SQL, its changes read back in chunks and handed on; the scheduler
that refreshes every due segment (bounded concurrency); the ``segment.refresh`` action.

:class:`ScheduledRefresh` is that part of :class:`~segflowd.segments.engine.SegmentService`;
the service owns the attributes it declares and sets them in ``__init__``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Mapping

import anyio
import sqlalchemy as sa
import structlog

from ..app import evaluating_at
from ..errors import AppError, StoreUnavailable
from ..hooks import MembershipChange
from ..schema import segment_changes
from ..store import is_unavailable
from .outputs import MembershipOutputs, SegmentState
from .query import (
    CHANGES_CHUNK,
    CompiledSegment,
    db_message,
    member_count,
    refresh_diff,
    save_state,
)

__all__ = ["REFRESH_CONCURRENCY", "RETRY_DELAY", "RefreshResult", "ScheduledRefresh"]

log = structlog.get_logger("segflowd.segments")

REFRESH_CONCURRENCY = 2  # segments refreshed at the same time
SCHEDULER_IDLE_SLEEP = 86400.0  # seconds the scheduler sleeps with nothing due (it is woken)
RETRY_DELAY = 1.0  # seconds before retrying a round the store was unavailable for


@dataclasses.dataclass(frozen=True)
class RefreshResult:
    segment: str
    entered: int
    exited: int
    size: int
    evaluated_at: dt.datetime
    top: int = 0  # the highest segment change id the refresh wrote (0: none)

    def as_json(self) -> dict[str, object]:
        return {"segment": self.segment, "entered": self.entered, "exited": self.exited,
                "size": self.size, "evaluated_at": self.evaluated_at.isoformat() + "Z"}


class ScheduledRefresh(MembershipOutputs):
    """Scheduled refresh of :class:`~segflowd.segments.engine.SegmentService`."""

    _segments: dict[str, CompiledSegment]
    _locks: dict[str, anyio.Lock]
    _deliver_lock: anyio.Lock
    _deferred: dict[str, set[str]]
    _forgotten: dict[str, list[MembershipChange]]
    _sweep: set[str]
    # Every refresh, scheduled or asked for (``segment.refresh``), waits for a place here.
    _refresh_limiter: anyio.CapacityLimiter
    _wake: anyio.Event
    _sched_wake: anyio.Event

    async def refresh(self, name: str) -> RefreshResult:
        """Recompute segment ``name`` now and apply the difference; AppError if broken.

        At most :data:`REFRESH_CONCURRENCY` refreshes run at once, whoever asks."""
        if name not in self._state:
            raise ValueError(f"unknown segment {name!r}; known: "
                             + ", ".join(sorted(self._state)) if self._state else
                             f"unknown segment {name!r}: the app defines no segments")
        seg = self._segments.get(name)
        st = self._state[name]
        if seg is None:
            raise AppError(st.error or f"segment {name!r} is broken")
        async with self._refresh_limiter, self._locks[name]:
            st.refreshing = True
            floor = self._changes_opening()
            st.refresh_committed = False
            try:
                result = await self._refresh_locked(seg, st)
                self._changes_closed(floor, result.top)
            except Exception as exc:
                if (is_unavailable(exc) or isinstance(exc, StoreUnavailable)
                        or st.refresh_committed):
                    # The COMMIT may have applied, or did and the hand-off broke off: the
                    # floor stays, so no durable cursor passes changes nobody was told of
                    # (a restart catches up from the cursor).
                    if not (is_unavailable(exc) or isinstance(exc, StoreUnavailable)):
                        await self._segment_failed(name, exc)
                        raise AppError(f"segment {name!r}: refresh failed: "
                                       f"{db_message(exc)}") from None
                    raise
                self._changes_closed(floor, 0)
                await self._segment_failed(name, exc)
                raise AppError(f"segment {name!r}: refresh failed: {db_message(exc)}") from None
            finally:
                st.refreshing = False
                if st.forgotten_during:  # what this refresh wrote of them is swept
                    self._sweep |= st.forgotten_during
                    st.forgotten_during = set()
                self._sched_wake.set()
                if self._deferred.get(name) or self._forgotten.get(name) or self._sweep:
                    self._wake.set()
        return result

    async def _refresh_locked(self, seg: CompiledSegment, st: SegmentState) -> RefreshResult:
        name = seg.name
        now = self.k.clock.now()
        # On SQLite (small stores) the refresh is finished rather than cancelled mid-way;
        # MariaDB rolls back a cancelled one when the connection is dropped.
        shield = self.k.store.dialect == "sqlite"
        with evaluating_at(now), anyio.CancelScope(shield=shield):
            async with self.k.store.begin() as conn:
                before, after, entered, exited = await refresh_diff(conn, seg, now)
                size = await member_count(conn, name)
                nxt = now + dt.timedelta(seconds=seg.defn.refresh)
                await save_state(conn, name, last_refresh_at=now, next_refresh_at=nxt,
                                  size=size, last_error=None)
        st.refresh_committed = True
        st.size, st.last_refresh_at, st.next_refresh_at, st.error = size, now, nxt, None
        self._refreshes += 1
        # Handed on while the lock is held, so a later incremental change of this
        # segment cannot reach the sinks before these.
        last = before
        while last < after:
            async with self.k.store.connect() as conn:
                rows = (await conn.execute(
                    sa.select(segment_changes.c.id, segment_changes.c.user_id,
                              segment_changes.c.entered)
                    .where(segment_changes.c.segment == name, segment_changes.c.id > last,
                           segment_changes.c.id <= after)
                    .order_by(segment_changes.c.id).limit(CHANGES_CHUNK))).all()
            if not rows:
                break
            last = int(rows[-1][0])
            changes = [MembershipChange(segment=name, user_id=str(r[1]), entered=bool(r[2]),
                                        at=now) for r in rows]
            async with self._deliver_lock:
                await self._deliver(name, changes, adjust_size=False)
        log.info("segment.refreshed", segment=name, entered=entered, exited=exited, size=size)
        self.k.bus.publish("segment.refreshed", segment=name, entered=entered, exited=exited,
                           size=size)
        return RefreshResult(name, entered, exited, size, now, after)

    async def refresh_due(self) -> list[RefreshResult]:
        """Refresh every segment whose time has come (bounded concurrency); for tests."""
        due = self._due(self.k.clock.now())
        results: list[RefreshResult] = []

        async def one(name: str) -> None:
            # A broken segment is recorded and logged by refresh(); the others go on.
            with contextlib.suppress(AppError):
                results.append(await self.refresh(name))

        async with anyio.create_task_group() as tg:
            for name in due:
                tg.start_soon(one, name)
        return results

    def _due(self, now: dt.datetime) -> list[str]:
        return [n for n, st in self._state.items()
                if n in self._segments and not st.refreshing and not st.scheduled
                and st.next_refresh_at is not None and st.next_refresh_at <= now]

    async def _schedule_loop(self) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                now = self.k.clock.now()
                for name in self._due(now):
                    self._state[name].scheduled = True
                    tg.start_soon(self._scheduled_refresh, name)
                waiting = [st.next_refresh_at for n, st in self._state.items()
                           if n in self._segments and not st.scheduled
                           and st.next_refresh_at is not None]
                # A finished refresh sets the wake event, so sleeping until the earliest
                # due time (or until woken, when every segment is in progress) is enough.
                delay = SCHEDULER_IDLE_SLEEP
                if waiting:
                    delay = min(delay, max(0.0, (min(waiting) - now).total_seconds()))
                await self._sleep_or_wake(delay)

    async def _scheduled_refresh(self, name: str) -> None:
        st = self._state[name]
        try:
            await self.refresh(name)
        except AppError:
            # Recorded; try again after the interval rather than in a tight loop.
            st.next_refresh_at = self.k.clock.now() + dt.timedelta(
                seconds=self.k.app.segments[name].refresh)
        except Exception as exc:
            if not (is_unavailable(exc) or isinstance(exc, StoreUnavailable)):
                raise
            log.warning("segments.store_unavailable", segment=name, error=db_message(exc))
            st.next_refresh_at = self.k.clock.now() + dt.timedelta(seconds=RETRY_DELAY)
        finally:
            st.scheduled = False
            self._sched_wake.set()

    async def _sleep_or_wake(self, seconds: float) -> None:
        wake = self._sched_wake
        if wake.is_set():
            self._sched_wake = anyio.Event()
            return
        async with anyio.create_task_group() as tg:
            async def sleeper() -> None:
                await self.k.clock.sleep(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(sleeper)
            await wake.wait()
            tg.cancel_scope.cancel()
        if self._sched_wake is wake and wake.is_set():
            self._sched_wake = anyio.Event()

    async def _action_refresh(self, args: Mapping[str, object]) -> object:
        name = args.get("segment")
        if not isinstance(name, str):
            raise ValueError("segment.refresh needs {\"segment\": name}")
        return (await self.refresh(name)).as_json()
