"""The segment engine's outputs and bookkeeping: each segment's in-memory state, the
hand-off of applied changes to the :class:`~segflowd.hooks.MembershipSink` list and the bus,
the recording of a failing segment, and the engine's metrics and statistics.

:class:`MembershipOutputs` is the part of :class:`~segflowd.segments.engine.SegmentService`
that reports; the service owns the attributes it declares and sets them in ``__init__``.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
from collections.abc import Sequence

import structlog

from ..hooks import ChangeCursorSink, MembershipChange, MembershipSink
from ..kernel import Kernel
from ..metrics import SEGMENT_ENTRY_BUCKETS, Histogram, Metrics, Sample
from .query import db_message, save_state

__all__ = ["MembershipOutputs", "SegmentInfo", "SegmentState", "SegmentStatistics"]

log = structlog.get_logger("segflowd.segments")

BUS_CHANGES_PER_CHUNK = 1000  # entered/exited bus events per chunk; beyond, one summary
RATE_WINDOW = 10.0  # seconds of history behind evaluations_per_second


def entry_seconds_histogram(metrics: Metrics) -> Histogram:
    return metrics.histogram(
        "segflow_segment_entry_seconds",
        "from an event's receipt to the segment entry it caused being applied, in seconds",
        SEGMENT_ENTRY_BUCKETS)


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
    name: str
    size: int
    last_refresh_at: dt.datetime | None
    next_refresh_at: dt.datetime | None
    refreshing: bool
    last_error: str | None


@dataclasses.dataclass(frozen=True)
class SegmentStatistics:
    segments: tuple[SegmentInfo, ...]
    dirty: int  # users waiting for incremental evaluation
    evaluated: int  # user evaluations done incrementally (users x segments)
    evaluations_per_second: float  # over the last RATE_WINDOW seconds
    changes: int  # entries + exits applied since start
    refreshes: int


@dataclasses.dataclass
class SegmentState:
    """One segment's state in memory: what :class:`SegmentInfo` reports, and the
    scheduler's flags."""

    size: int = 0
    last_refresh_at: dt.datetime | None = None
    next_refresh_at: dt.datetime | None = None
    refreshing: bool = False
    scheduled: bool = False
    error: str | None = None
    refresh_committed: bool = False  # the running refresh's diff is committed
    # users forgotten while the segment refreshed: a refresh that read them before the
    # forget committed may have admitted them after it (MySQL); swept when it ends
    forgotten_during: set[str] = dataclasses.field(default_factory=set)


class MembershipOutputs:
    """Outputs and bookkeeping of :class:`~segflowd.segments.engine.SegmentService`."""

    k: Kernel
    sinks: Sequence[MembershipSink]
    _state: dict[str, SegmentState]
    _dirty: set[str]
    _evaluated: int
    _changes: int
    _refreshes: int
    _rate: collections.deque[tuple[float, int]]
    # Durable sinks' cursor over segment_changes.id: the highest id handed over, and the
    # floors of the writers still between their first write and their hand-off (each of
    # their changes has an id above its floor, whatever order the commits land in).
    _ch_seen: int
    _ch_inflight: collections.Counter[int]
    _received: dict[int, dt.datetime]  # ingested event id -> received_at, until its round
    _entry_seconds: Histogram

    def _observe_entries(self, changes: Sequence[MembershipChange]) -> None:
        """Entries an ingested event caused, just applied: their latency from its receipt."""
        applied, received = self.k.clock.now(), self._received
        for c in changes:
            if c.entered and c.event_id is not None and c.event_id in received:
                seconds = (applied - received[c.event_id]).total_seconds()
                self._entry_seconds.observe(max(0.0, seconds))

    def _received_done(self, causes: dict[str, int]) -> None:
        """A round evaluated ``causes``: forget the receipt times of those events and older
        (ids grow in commit order; newer ones wait for the next round)."""
        if self._received:
            top = max(causes.values(), default=0)
            self._received = {i: t for i, t in self._received.items() if i > top}

    def _changes_opening(self) -> int:
        """A writer of segment_changes begins: its floor (release with _changes_closed)."""
        floor = self._ch_seen
        self._ch_inflight[floor] += 1
        return floor

    def _changes_closed(self, floor: int, top: int) -> None:
        """The writer's changes (ids up to ``top``) were handed over, or never written."""
        self._ch_seen = max(self._ch_seen, top)
        self._ch_inflight[floor] -= 1
        if self._ch_inflight[floor] <= 0:
            del self._ch_inflight[floor]
        through = min(self._ch_inflight) if self._ch_inflight else self._ch_seen
        for sink in list(self.sinks):
            if isinstance(sink, ChangeCursorSink):
                sink.changes_through(through)

    async def _deliver(self, name: str, changes: Sequence[MembershipChange], *,
                       adjust_size: bool = True) -> None:
        if not changes:
            return
        self._changes += len(changes)
        if adjust_size:
            st = self._state[name]
            st.size += sum(1 if c.entered else -1 for c in changes)
        for sink in list(self.sinks):
            try:
                await sink.membership_changed(changes)
            except Exception:
                log.exception("segments.sink_failed", sink=type(sink).__name__, segment=name)
        bus = self.k.bus
        for c in changes[:BUS_CHANGES_PER_CHUNK]:
            bus.publish("segment.entered" if c.entered else "segment.exited",
                        segment=c.segment, user_id=c.user_id)
        if len(changes) > BUS_CHANGES_PER_CHUNK:
            bus.publish("segment.changes_summarized", segment=name,
                        not_published=len(changes) - BUS_CHANGES_PER_CHUNK)

    def _count(self, users_evaluated: int) -> None:
        self._evaluated += users_evaluated
        mono = self.k.clock.monotonic()
        if self._rate and self._rate[-1][0] == mono:  # one entry per clock reading: a
            self._rate[-1] = (mono, self._rate[-1][1] + users_evaluated)  # frozen clock
        else:  # (a simulation's, or a coarse one) must not grow it without bound
            self._rate.append((mono, users_evaluated))
        while self._rate and self._rate[0][0] < mono - RATE_WINDOW:
            self._rate.popleft()

    async def _segment_failed(self, name: str, exc: BaseException) -> None:
        message = db_message(exc)
        defn = self.k.app.segments[name]
        text = f"{defn.origin}: segment {name!r} fails on the store: {message}"
        log.error("segment.failed", segment=name, error=message)
        self._state[name].error = text
        self.k.bus.publish("segment.failed", segment=name, error=message)
        await self._save_error(name, text)

    async def _mark_broken(self, name: str, message: str) -> None:
        log.error("segment.broken", segment=name, error=message)
        self._state[name].error = message
        self.k.bus.publish("segment.failed", segment=name, error=message)
        await self._save_error(name, message)

    async def _save_error(self, name: str, message: str | None) -> None:
        try:
            async with self.k.store.begin() as conn:
                await save_state(conn, name, last_error=message)
        except Exception as exc:  # the error is in memory and logged; the store is down
            log.warning("segments.state_not_saved", segment=name, error=db_message(exc))

    def _collect(self) -> list[Sample]:
        out: list[Sample] = [("segflow_segment_dirty_users", {}, float(len(self._dirty))),
                             ("segflow_segment_changes_total", {}, float(self._changes))]
        for name, st in self._state.items():
            out.append(("segflow_segment_members", {"segment": name}, float(st.size)))
            out.append(("segflow_segment_broken", {"segment": name},
                        1.0 if st.error else 0.0))
        return out

    def statistics(self) -> SegmentStatistics:
        mono = self.k.clock.monotonic()
        recent = sum(n for t, n in self._rate if t >= mono - RATE_WINDOW)
        return SegmentStatistics(
            segments=tuple(
                SegmentInfo(name=n, size=st.size, last_refresh_at=st.last_refresh_at,
                            next_refresh_at=st.next_refresh_at, refreshing=st.refreshing,
                            last_error=st.error)
                for n, st in sorted(self._state.items())),
            dirty=len(self._dirty),
            evaluated=self._evaluated,
            evaluations_per_second=recent / RATE_WINDOW,
            changes=self._changes,
            refreshes=self._refreshes,
        )
