"""The segment engine: users touched by ingest are re-evaluated within milliseconds, and
every segment is recomputed on its refresh interval (segments whose truth moves with time).

**Incremental.** :meth:`SegmentService.ingested` adds the batch's users to a dirty set and
wakes the drainer, which takes the whole set, evaluates it in batches of
:data:`DRAIN_BATCH` users (one query per segment per batch: the segment narrowed to those
ids) against the segments that read a table ingest writes, and applies the difference
with the stored membership.

**Scheduled.** A refresh recomputes the whole segment and diffs it against
``segment_members`` in SQL (``INSERT ... SELECT`` of the changes into ``segment_changes``,
then members from those rows): no member id passes through Python except the changes,
which are read back in chunks and handed on.

**The race rule.** Every result carries its evaluation time ``T`` (``kernel.clock.now()``,
also the ``now`` of every :func:`~segflowd.app.ago` in it), stored as
``segment_members.evaluated_at`` and ``segment_changes.at``. For one segment, evaluation
and application happen under one lock, incremental and scheduled alike, and ``T`` is
taken under that lock; so results are applied in the order of their evaluation times and
each one saw every write committed before it. A result is never applied over a newer
one: an exit is skipped for a member row whose ``evaluated_at`` is later than the
result's ``T``. While a segment is refreshing, the drainer does not wait for it: the
users it would have evaluated for that segment are deferred and evaluated as soon as the
refresh is applied, so a change that landed during the refresh is not lost to it.

**Outputs.** Each change is committed (``segment_members`` + ``segment_changes``), then
handed to every :class:`~segflowd.hooks.MembershipSink` in order and published on the bus
as ``segment.entered`` / ``segment.exited``.

**Catch-up.** The dirty set is only the fast path: after each drained round the engine
stores a cursor (last event id, last user ``updated_at``) in ``engine_cursors``; at start
it re-evaluates every user touched after it.

**Layout.** :class:`SegmentService` is built in layers: this module holds the incremental
path, start-up and catch-up; :mod:`.refresh` the scheduled refresh
(:class:`~.refresh.ScheduledRefresh`); :mod:`.outputs` the hand-off of changes, the
per-segment state and the statistics (:class:`~.outputs.MembershipOutputs`).
"""

from __future__ import annotations

import collections
import datetime as dt
import math
import time
from collections.abc import Iterable, Mapping, Sequence

import anyio
import anyio.lowlevel
import sqlalchemy as sa
import structlog
from anyio.abc import TaskStatus
from sqlalchemy.ext.asyncio import AsyncConnection

from ..app import evaluating_at
from ..cursors import (
    SAVE_INTERVAL,
    Cursor,
    load_cursor,
    max_change_id,
    max_event_id,
    save_cursor,
)
from ..errors import AppError, StoreUnavailable
from ..hooks import INGEST_TABLES, IngestBatch, MembershipChange, MembershipSink
from ..http import Router
from ..kernel import Kernel
from ..schema import events, segment_state, users
from ..store import is_unavailable
from .outputs import SegmentState, entry_seconds_histogram
from .query import (
    CompiledSegment,
    apply_batch,
    compile_segment,
    db_message,
    member_count,
    probe_segment,
    sweep_orphans,
)
from .refresh import REFRESH_CONCURRENCY, RETRY_DELAY, ScheduledRefresh

__all__ = ["SegmentService"]

log = structlog.get_logger("segflowd.segments")

DRAIN_BATCH = 1000  # users per evaluation query
EVAL_CONCURRENCY = 4  # segments evaluated at the same time for one batch of users
# A user committed just before the drainer took its set may be delivered just after:
# the stored cursor trails the last hand-off by this much, so a restart re-covers it.
CURSOR_SLACK = 60.0  # seconds
CURSOR_NAME = "segments"


class SegmentService(ScheduledRefresh):
    """Keeps ``segment_members`` current; a daemon :class:`~segflowd.daemon.Service`.

    Tests may drive it without :meth:`run`: :meth:`start` once, then :meth:`ingested`
    and :meth:`drain_once`, :meth:`refresh`, :meth:`refresh_due`.
    """

    name = "segments"

    def __init__(self, kernel: Kernel, *,
                 membership_sinks: Sequence[MembershipSink] = ()) -> None:
        self.k = kernel
        self.sinks = membership_sinks  # shared by reference with the daemon's list
        self._segments: dict[str, CompiledSegment] = {}
        self._state: dict[str, SegmentState] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._eval_limiter = anyio.CapacityLimiter(EVAL_CONCURRENCY)
        self._refresh_limiter = anyio.CapacityLimiter(REFRESH_CONCURRENCY)
        self._deliver_lock = anyio.Lock()  # sinks are told one segment's changes at a time
        self._dirty: set[str] = set()
        self._causes: dict[str, int] = {}  # user -> last event id that made them dirty
        self._deferred: dict[str, set[str]] = {}  # segment -> users to evaluate after refresh
        # segment -> the mark of the round before its users were first deferred: the
        # cursor is never saved past it while they wait (a restart catches them up)
        self._deferred_since: dict[str, Cursor | None] = {}
        self._last_mark: Cursor | None = None  # the mark of the last round that finished
        self._tables: set[str] = set()  # store tables written for the dirty users
        # segment -> exits of forgotten users, reported (and the size recounted) when the
        # segment is not refreshing
        self._forgotten: dict[str, list[MembershipChange]] = {}
        # forgotten users whose rows a refresh (on MySQL) may have written again
        self._sweep: set[str] = set()
        self._seen_event_id = 0
        self._seen_at: dt.datetime | None = None
        self._cursor_owed: Cursor | None = None  # the last round's, not saved yet
        self._cursor_saved_at = -math.inf  # time.monotonic() of the last save
        self._wake = anyio.Event()
        self._sched_wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._started = False
        self._evaluated = 0
        self._changes = 0
        self._refreshes = 0
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._ch_seen = 0
        self._ch_inflight: collections.Counter[int] = collections.Counter()
        kernel.actions["segment.refresh"] = self._action_refresh
        kernel.stats["segments"] = self.statistics
        m = kernel.metrics
        m.describe("segflow_segment_members", "gauge", "users in the segment")
        m.describe("segflow_segment_dirty_users", "gauge", "users waiting for evaluation")
        m.describe("segflow_segment_changes_total", "counter", "entries and exits applied")
        m.describe("segflow_segment_broken", "gauge", "1 while the segment fails on the store")
        m.collect(self._collect)
        self._received: dict[int, dt.datetime] = {}
        self._entry_seconds = entry_seconds_histogram(m)

    # -- service ---------------------------------------------------------------------

    def register_routes(self, router: Router) -> None:
        """No HTTP routes: membership is read through the user API and the control socket."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._drain_loop)
            tg.start_soon(self._schedule_loop)
            task_status.started()

    async def drain(self) -> None:
        """Finish the users already handed over (the daemon bounds how long)."""
        while self._dirty or self._ready() or not self._idle.is_set():
            self._wake.set()
            await self._idle.wait()
            await anyio.lowlevel.checkpoint()
        try:
            await self._save_cursor(force=True)
        except Exception as exc:  # at start, catching up from the older cursor redoes it
            log.warning("segments.cursor_not_saved", error=db_message(exc))

    # -- startup ---------------------------------------------------------------------

    async def start(self) -> None:
        """Compile and probe every segment, load its state, and catch up from the cursor.

        A broken segment is logged and recorded by name with the database's message; the
        others run. Idempotent.
        """
        if self._started:
            return
        self._started = True
        now = self.k.clock.now()
        async with self.k.store.connect() as conn:
            stored = {r.segment: r for r in (await conn.execute(sa.select(segment_state))).all()}
            self._ch_seen = await max_change_id(conn)
        for name, defn in self.k.app.segments.items():
            self._locks[name] = anyio.Lock()
            row = stored.get(name)
            st = SegmentState()
            if row is not None:
                st.size, st.last_refresh_at = int(row.size), row.last_refresh_at
                st.next_refresh_at = row.next_refresh_at
                if st.last_refresh_at is not None and st.next_refresh_at is not None:
                    # The interval may have been shortened since the last run.
                    st.next_refresh_at = min(st.next_refresh_at, st.last_refresh_at
                                             + dt.timedelta(seconds=defn.refresh))
            if st.next_refresh_at is None:
                st.next_refresh_at = now
            self._state[name] = st
            try:
                compiled = compile_segment(defn)
                await probe_segment(self.k.store, defn, now)
            except AppError as exc:
                await self._mark_broken(name, str(exc))
                continue
            self._segments[name] = compiled
            if row is not None and row.last_error:
                await self._save_error(name, None)
        await self._catch_up(now)

    async def _catch_up(self, now: dt.datetime) -> None:
        async with self.k.store.begin() as conn:
            cursor = await load_cursor(conn, CURSOR_NAME)
            top = await max_event_id(conn)
            if cursor is None:
                # A fresh store (or first run): the first refresh of every segment covers
                # everyone already there.
                await save_cursor(conn, CURSOR_NAME, Cursor(top, now), now)
            else:
                touched = set(await self._touched_since(conn, cursor))
                self._dirty |= touched
                if touched:
                    log.info("segments.catch_up", users=len(touched),
                             since_event_id=cursor.last_event_id)
                    self._wake.set()
        self._seen_event_id = max(self._seen_event_id, top)
        self._seen_at = now
        self._last_mark = cursor if cursor is not None else Cursor(top, now)

    @staticmethod
    async def _touched_since(conn: AsyncConnection, cursor: Cursor) -> Iterable[str]:
        found: set[str] = set()
        q = sa.select(events.c.user_id).where(events.c.id > cursor.last_event_id,
                                              events.c.user_id.is_not(None)).distinct()
        found.update(str(u) for u in (await conn.execute(q)).scalars())
        if cursor.last_user_updated_at is not None:
            q = sa.select(users.c.id).where(users.c.updated_at > cursor.last_user_updated_at)
            found.update(str(u) for u in (await conn.execute(q)).scalars())
        return found

    # -- incremental -----------------------------------------------------------------

    def ingested(self, batch: IngestBatch) -> None:
        """Mark the batch's users dirty and wake the drainer; returns at once."""
        for e in batch.events:
            if e.user_id is not None:
                self._causes[e.user_id] = e.id
                self._received[e.id] = e.received_at
            self._seen_event_id = max(self._seen_event_id, e.id)
        self._dirty |= batch.users
        self._dirty |= {e.user_id for e in batch.events if e.user_id is not None}
        # A forgotten user's memberships went with them, unless the same flush created
        # the id again (then it is a new user, to evaluate).
        gone = batch.deleted - batch.users
        self._dirty -= gone
        for uid in gone:
            self._causes.pop(uid, None)
        for deferred in self._deferred.values():
            deferred -= gone
        # A refresh that read them before the forget committed may still write them
        # (MySQL reads without locks): swept now, and again once such a refresh ends.
        self._sweep |= gone
        for st in self._state.values():
            if st.refreshing:
                st.forgotten_during |= gone
        now = self.k.clock.now()
        for uid, segments in batch.left.items():
            for name in segments:
                if name in self._state:
                    self._forgotten.setdefault(name, []).append(MembershipChange(
                        segment=name, user_id=uid, entered=False, at=now, forgotten=True))
        self._tables |= batch.tables
        self._seen_at = now
        if self._dirty or self._forgotten or self._sweep:
            self._wake.set()

    def _ready(self) -> bool:
        """Whether deferred work waits for a segment that is no longer refreshing."""
        return bool(self._sweep) or any(not self._state[n].refreshing
                                        for n in (*self._deferred, *self._forgotten))

    async def drain_once(self) -> list[MembershipChange]:
        """Evaluate every user dirty now (and every deferred one); return the changes."""
        self._idle = anyio.Event()
        try:
            return await self._round()
        finally:
            self._idle.set()

    async def _round(self) -> list[MembershipChange]:
        ids, self._dirty = sorted(self._dirty), set()
        causes, self._causes = self._causes, {}
        tables, self._tables = frozenset(self._tables | INGEST_TABLES), set()
        mark = Cursor(self._seen_event_id, self._seen_at)
        ready = {name: sorted(users_) for name, users_ in self._deferred.items()
                 if not self._state[name].refreshing}
        since = {name: self._deferred_since.pop(name, None) for name in ready}
        for name in ready:
            del self._deferred[name]
        out: list[MembershipChange] = []
        try:
            await self._sweep_forgotten()
            out += await self._report_forgotten()
            for i in range(0, len(ids), DRAIN_BATCH):
                out += await self.evaluate_users(ids[i:i + DRAIN_BATCH], causes=causes,
                                                 tables=tables)
            for name, deferred in ready.items():
                for i in range(0, len(deferred), DRAIN_BATCH):
                    out += await self.evaluate_users(deferred[i:i + DRAIN_BATCH],
                                                     only=name)
        except BaseException:
            # Nothing is lost: the store is the log, and the ids go back to the set.
            self._dirty.update(ids)
            self._tables |= tables
            for name, deferred in ready.items():
                self._deferred.setdefault(name, set()).update(deferred)
                self._deferred_since[name] = since[name]  # the older mark holds
            for uid, eid in causes.items():
                self._causes.setdefault(uid, eid)
            raise
        self._last_mark = mark
        self._received_done(causes)
        # A cursor saved past users deferred behind a refresh would lose them to a
        # restart: it stops at the oldest mark from before a deferral still waiting.
        safe = _earliest([mark, *self._deferred_since.values()])
        if safe is not None and safe.last_user_updated_at is not None:
            slack = safe.last_user_updated_at - dt.timedelta(seconds=CURSOR_SLACK)
            self._cursor_owed = Cursor(safe.last_event_id, slack)
            await self._save_cursor()
        return out

    async def _sweep_forgotten(self) -> None:
        """Delete segment rows of forgotten users that a refresh wrote after their forget
        (their user is gone; one created again since keeps its rows), and queue the exits."""
        gone, self._sweep = sorted(self._sweep), set()
        if not gone:
            return
        # A refreshing segment's rows may be uncommitted (the sweep would wait for the
        # whole refresh): skipped now, swept when that refresh ends (forgotten_during).
        skip = sorted(n for n, st in self._state.items() if st.refreshing)
        for name in skip:
            self._state[name].forgotten_during.update(gone)
        try:
            with anyio.CancelScope(shield=True):
                async with self.k.store.begin() as conn:
                    found = await sweep_orphans(conn, gone, skip)
        except BaseException:
            self._sweep.update(gone)
            raise
        now = self.k.clock.now()
        for name, uid in found:
            if name in self._state:
                self._forgotten.setdefault(name, []).append(MembershipChange(
                    segment=name, user_id=uid, entered=False, at=now, forgotten=True))

    async def _report_forgotten(self) -> list[MembershipChange]:
        """Hand on the exits of forgotten users, for each segment not refreshing, and
        recount its members (under its lock, so no evaluation's count interleaves)."""
        out: list[MembershipChange] = []
        for name in [n for n in self._forgotten if not self._state[n].refreshing]:
            lock = self._locks[name]
            try:
                lock.acquire_nowait()
            except anyio.WouldBlock:
                # A refresh holds it (it began, or is just ending): after it, then. Yield,
                # so a refresh in its last step can let go before the next round.
                await anyio.lowlevel.checkpoint()
                continue
            changes = self._forgotten.pop(name)
            try:
                async with self.k.store.connect() as conn:
                    self._state[name].size = await member_count(conn, name)
                async with self._deliver_lock:
                    await self._deliver(name, changes, adjust_size=False)
            except BaseException:
                self._forgotten.setdefault(name, []).extend(changes)
                raise
            finally:
                lock.release()
            out += changes
        return out

    async def _save_cursor(self, *, force: bool = False) -> None:
        """Save the cursor of the last round: at most every SAVE_INTERVAL seconds (the
        drain loop comes back for a save it put off), or now with ``force``."""
        cursor = self._cursor_owed
        if cursor is None:
            return
        if not force and time.monotonic() - self._cursor_saved_at < SAVE_INTERVAL:
            return
        with anyio.CancelScope(shield=True):
            async with self.k.store.begin() as conn:
                await save_cursor(conn, CURSOR_NAME, cursor, self.k.clock.now())
        if self._cursor_owed is cursor:
            self._cursor_owed = None
        self._cursor_saved_at = time.monotonic()

    async def evaluate_users(self, user_ids: Sequence[str], *,
                             causes: Mapping[str, int] | None = None,
                             only: str | None = None,
                             tables: frozenset[str] = INGEST_TABLES,
                             ) -> list[MembershipChange]:
        """Re-evaluate ``user_ids`` against every segment that reads any of ``tables``
        (the tables written for them), or only segment ``only``.

        Segments are evaluated concurrently (each in its own transaction, under its own
        lock); their changes reach the sinks one segment at a time.
        """
        names: list[str] = []
        for name, seg in list(self._segments.items()):
            if only is not None and name != only:
                continue
            if only is None and not seg.reads_any(tables):
                continue
            if self._state[name].refreshing:
                if name not in self._deferred:
                    self._deferred_since[name] = self._last_mark
                self._deferred.setdefault(name, set()).update(user_ids)
                continue
            names.append(name)
        found: dict[str, list[MembershipChange]] = {}
        failures: list[BaseException] = []

        async def one(name: str) -> None:
            async with self._eval_limiter, self._locks[name]:
                now = self.k.clock.now()
                floor = self._changes_opening()
                top = 0
                try:
                    # Shielded: a short transaction is finished, not abandoned, on
                    # shutdown (SQLite cannot roll back a transaction cancelled mid-way).
                    with evaluating_at(now), anyio.CancelScope(shield=True):
                        async with self.k.store.begin() as conn:
                            changes = await apply_batch(conn, self._segments[name],
                                                         user_ids, now, causes)
                            if changes:
                                top = await max_change_id(conn)
                except Exception as exc:
                    if is_unavailable(exc) or isinstance(exc, StoreUnavailable):
                        # The COMMIT may have applied: the floor stays, so no durable
                        # cursor passes changes nobody was told of (a restart catches up).
                        failures.append(exc)
                        return
                    self._changes_closed(floor, 0)  # rolled back: nothing was written
                    await self._segment_failed(name, exc)
                    return
                self._count(len(user_ids))
                self._observe_entries(changes)
                async with self._deliver_lock:
                    await self._deliver(name, changes)
                    self._changes_closed(floor, top)
                found[name] = changes

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(one, name)
        if failures:
            raise failures[0]
        return [c for name in names for c in found.get(name, ())]

    async def _drain_loop(self) -> None:
        while True:
            if self._cursor_owed is not None:  # come back for it once it is due
                with anyio.move_on_after(SAVE_INTERVAL):
                    await self._wake.wait()
            else:
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                while self._dirty or self._ready():
                    await self.drain_once()
                await self._save_cursor()  # a save the last rounds put off, once due
            except Exception as exc:
                if not (is_unavailable(exc) or isinstance(exc, StoreUnavailable)):
                    raise
                log.warning("segments.store_unavailable", error=db_message(exc),
                            retry_in_s=RETRY_DELAY)
                await self.k.clock.sleep(RETRY_DELAY)
                self._wake.set()


def _earliest(marks: Sequence[Cursor | None]) -> Cursor | None:
    """The cursor no later than any of ``marks`` (None if one of them is unknown)."""
    if any(m is None or m.last_user_updated_at is None for m in marks):
        return None
    known = [m for m in marks if m is not None]
    times = [m.last_user_updated_at for m in known if m.last_user_updated_at is not None]
    return Cursor(min(m.last_event_id for m in known), min(times))
