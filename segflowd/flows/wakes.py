"""``wait_for_event`` wakes: events matched to the instances waiting for them.

The fast path is the in-memory hand-off from ingest (:meth:`Wakes.ingested`): each
committed batch is matched to waiting instances in one query. The store is the
checkpoint, as for timers:

* a wait records ``wait_after``, the highest event id stored when it began; only an event
  above it wakes that wait, whichever path finds it;
* a durable cursor (``engine_cursors`` row :data:`CURSOR_NAME`) trails every event whose
  wakes have been stepped; at start, events above it are matched against the store again,
  so an event committed just before a crash still wakes its wait;
* right after a round of steps commits new waits, the store is asked for events that
  arrived while those steps ran (before the waits were visible to the fast path);
* resuming a paused campaign matches its waits against the store (a paused campaign's
  wakes are dropped by the stepper).

A wake found twice is harmless: it names the seq of the wait it matched, and a step that
finds the instance moved on does nothing.

A mixin of :class:`~segflowd.flows.service.FlowService`, which owns the state it reads.
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from ..cursors import SAVE_INTERVAL, Cursor, load_cursor, max_event_id, save_cursor
from ..hooks import IngestBatch, StoredEvent
from ..schema import events, flow_instances
from ..store import is_unavailable
from .work import Work

if TYPE_CHECKING:
    from ..kernel import Kernel

__all__ = ["CATCH_UP_WINDOW", "CURSOR_NAME", "Wakes"]

log = structlog.get_logger("segflowd.flows")

CURSOR_NAME = "flows.events"  # the engine_cursors row of wait_for_event matching
CATCH_UP_WINDOW = 10_000  # event ids matched against the store per query at start
RECHECK_CHUNK = 500  # new waits checked against the store per query
MATCH_ATTEMPTS = 5  # tries at matching one batch (errors other than outages) before it is dropped
FINAL_SAVE_LIMIT = 5.0  # seconds the cursor save at shutdown may take

_MATCH = Work(-1, "event")  # the worker's cue to match queued batches and rechecks


class Wakes:
    """Matches events to waits and keeps the wake cursor; see the module docstring."""

    k: Kernel
    awaited: set[str]
    _event_batches: collections.deque[tuple[int, list[StoredEvent]]]
    # (instances whose new wait is to be checked against the store, the event id the
    # cursor is held below until it is)
    _rechecks: list[tuple[list[int], int]]
    _ev_seen: int  # the highest event id handed to flows
    _ev_pending: collections.Counter[int]  # event ids with a wake (or a match) outstanding
    _ev_saved: int  # the cursor as stored
    _match_failures: int  # failed tries at the batch at the head of the queue
    _resync: anyio.Event
    # (instance, event id) of wakes a paused campaign dropped -> the campaign; and per
    # campaign, the event ids whose release waits for its resume (one per dropped wake)
    _paused_wakes: dict[tuple[int, int], str]
    _release_on_resume: dict[str, list[int]]

    if TYPE_CHECKING:
        def _push(self, work: Work) -> None: ...

        async def _save_changes_cursor(self) -> None: ...

    # -- the fast path ---------------------------------------------------------------

    def ingested(self, batch: IngestBatch) -> None:
        """Queue the batch's events for instances waiting on them (matched in a task)."""
        if batch.events:
            self._ev_seen = max(self._ev_seen, max(e.id for e in batch.events))
        # only names some instance waits for (kept from the store at start, then here)
        evs = [e for e in batch.events if e.user_id is not None and e.name in self.awaited]
        if evs:
            first = min(e.id for e in evs)
            self._ev_pending[first] += 1  # the cursor stays below until it is matched
            self._event_batches.append((first, evs))
            self._push(_MATCH)

    def hold_wakes(self, from_event: int) -> None:
        """Keep the cursor below ``from_event`` until :meth:`waits_began` is done."""
        self._ev_pending[from_event] += 1

    def waits_began(self, instances: Iterable[int], from_event: int) -> None:
        """Steps that began a ``wait_for_event`` were committed (or may have been): look
        for events from ``from_event`` on that came while they ran (the fast path could
        not see the waits yet), then let the cursor pass."""
        self._rechecks.append((list(instances), from_event))
        self._push(_MATCH)

    async def _match_events(self) -> None:
        """Check new waits against the store, then wake instances waiting for the queued
        events (one query per batch). Rechecks go first: they find a wait's earliest
        events, and the first wake of a wait is the one its step takes."""
        fi = flow_instances.c
        while self._rechecks:
            instances, from_event = self._rechecks[0]
            async with self.k.store.connect() as conn:
                for lo in range(0, len(instances), RECHECK_CHUNK):
                    await self._match_stored(
                        conn, fi.id.in_(instances[lo:lo + RECHECK_CHUNK]))
            self._rechecks.pop(0)
            self._release(from_event)
        while self._event_batches:
            first, batch = self._event_batches[0]
            waiting: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
            # Not matched when this raises (the store is down, or shutdown): the batch
            # stays at the head of the queue, for the resync to match again.
            async with self.k.store.connect() as conn:
                for iid, uid, name, seq, after in await conn.execute(
                        sa.select(fi.id, fi.user_id, fi.wait_event, fi.seq, fi.wait_after)
                        .where(fi.user_id.in_({e.user_id for e in batch}),
                               fi.wait_event.in_({e.name for e in batch}),
                               fi.status == "waiting")):
                    waiting.setdefault((str(uid), str(name)), []).append(
                        (int(iid), int(seq), int(after or 0)))
            self._event_batches.popleft()
            self._match_failures = 0
            woken: set[int] = set()
            for e in batch:
                for iid, seq, after in waiting.get((str(e.user_id), e.name), ()):
                    if e.id > after and iid not in woken:  # its first event after the wait
                        woken.add(iid)
                        self._wake(iid, seq, e.id, e.name, dict(e.attributes), e.created_at)
            self._release(first)

    # -- the store as the checkpoint -------------------------------------------------

    async def _match_stored(self, conn: AsyncConnection, *where: Any) -> int:
        """Wake every waiting instance matching ``where`` by its first stored event above
        its ``wait_after``; the number woken."""
        fi, ev = flow_instances.c, events.c
        rows = await conn.execute(
            sa.select(fi.id, fi.seq, ev.id, ev.name, ev.attributes, ev.created_at)
            .select_from(flow_instances.join(events, sa.and_(
                ev.user_id == fi.user_id, ev.name == fi.wait_event,
                ev.id > fi.wait_after)))
            # a wait without wait_after (begun by an older segflowd) is left to the fast
            # path: which events came after it is not known
            .where(fi.status == "waiting", fi.live == 1, fi.wait_event.is_not(None),
                   fi.wait_after.is_not(None), *where)
            .order_by(fi.id, ev.id))
        woken: set[int] = set()
        for iid, seq, eid, name, attributes, created_at in rows:
            if int(iid) not in woken:
                woken.add(int(iid))
                self._wake(int(iid), int(seq), int(eid), str(name), dict(attributes or {}),
                           created_at)
        return len(woken)

    async def _match_campaign(self, campaign: str) -> int:
        """A resumed campaign's waits, matched against the events stored meanwhile."""
        async with self.k.store.connect() as conn:
            return await self._match_stored(conn, flow_instances.c.campaign == campaign)

    async def _catch_up_events(self) -> None:
        """At start: events stored after the cursor are matched again (their hand-off may
        have died with the last process)."""
        async with self.k.store.connect() as conn:
            cursor = await load_cursor(conn, CURSOR_NAME)
            top = await max_event_id(conn)
        self._ev_seen = max(self._ev_seen, top)
        if cursor is None:  # the first start on this store: every wait is newer than top
            async with self.k.store.begin() as conn:
                await save_cursor(conn, CURSOR_NAME, Cursor(top, None), self.k.clock.now())
            self._ev_saved = top
            return
        self._ev_saved = cursor.last_event_id
        if not self.awaited or top <= cursor.last_event_id:
            return
        ev = events.c
        woken = 0
        async with self.k.store.connect() as conn:
            for lo in range(cursor.last_event_id, top, CATCH_UP_WINDOW):
                hi = min(top, lo + CATCH_UP_WINDOW)
                woken += await self._match_stored(
                    conn, ev.id > lo, ev.id <= hi, ev.name.in_(sorted(self.awaited)))
        log.info("flow.events_caught_up", since=cursor.last_event_id, until=top, woken=woken)

    # -- the cursor ------------------------------------------------------------------

    def _match_failed(self) -> None:
        """Matching failed for a reason other than an outage: try again after the resync
        delay; a batch that fails :data:`MATCH_ATTEMPTS` times is given up (logged),
        so one bad batch cannot stall every wake after it."""
        if self._event_batches:
            self._match_failures += 1
            if self._match_failures >= MATCH_ATTEMPTS:
                first, batch = self._event_batches.popleft()
                log.error("flow.events_unmatched", first_event=first, events=len(batch))
                self._release(first)
                self._match_failures = 0
        self._resync.set()

    def _wake(self, iid: int, seq: int, eid: int, name: str, attributes: dict[str, object],
              created_at: dt.datetime) -> None:
        data: dict[str, object] = {"id": eid, "name": name, "attributes": attributes,
                                   "created_at": created_at.isoformat()}
        self._ev_pending[eid] += 1
        self._push(Work(iid, "event", data, name, seq))

    def _release(self, event_id: int) -> None:
        self._ev_pending[event_id] -= 1
        if self._ev_pending[event_id] <= 0:
            del self._ev_pending[event_id]

    def wakes_done(self, works: Sequence[Work]) -> None:
        """These event wakes were stepped (or found moot): the cursor may pass them."""
        for w in works:
            if w.kind == "event" and w.instance >= 0 and w.event is not None:
                eid = int(w.event["id"])  # type: ignore[call-overload]  # an int
                campaign = self._paused_wakes.get((w.instance, eid))
                if campaign is not None:  # dropped for a paused campaign: at its resume
                    self._release_on_resume.setdefault(campaign, []).append(eid)
                    continue
                self._release(eid)

    def hold_paused_wake(self, campaign: str, work: Work) -> None:
        """A paused campaign's instance was not woken by ``work``: keep the cursor below
        its event until :meth:`_release_paused` (after the resume matched again), so a
        crash in between still finds the event at the next start."""
        if work.event is None:
            return
        eid = int(work.event["id"])  # type: ignore[call-overload]  # an int
        # Marked, not counted: the same wake may be dropped again (pushed again after an
        # outage); what waits for the resume is each release wakes_done would have made.
        self._paused_wakes[(work.instance, eid)] = campaign

    def _release_paused(self, campaign: str) -> None:
        for key in [k for k, c in self._paused_wakes.items() if c == campaign]:
            del self._paused_wakes[key]
        for eid in self._release_on_resume.pop(campaign, ()):
            self._release(eid)

    def _safe_cursor(self) -> int:
        """Every event up to this id has had its wakes stepped."""
        if self._ev_pending:
            return min(self._ev_seen, min(self._ev_pending) - 1)
        return self._ev_seen

    async def _save_cursor(self) -> None:
        safe = self._safe_cursor()
        if safe <= self._ev_saved:
            return
        async with self.k.store.begin() as conn:
            await save_cursor(conn, CURSOR_NAME, Cursor(safe, None), self.k.clock.now())
        self._ev_saved = safe

    async def _cursor_saver(self) -> None:
        while True:
            # Real time, not the flow clock: a simulated month must not wake this 2.6M times.
            await anyio.sleep(SAVE_INTERVAL)
            try:
                await self._save_cursor()
                await self._save_changes_cursor()
            except Exception as exc:  # the store is down: saved next time
                if not is_unavailable(exc):
                    log.warning("flow.cursor_save_failed", error=str(exc)[:300])

    async def _final_cursor_save(self) -> None:
        # bounded: a store that stopped answering must not hold the shutdown
        with anyio.move_on_after(FINAL_SAVE_LIMIT, shield=True):
            try:
                await self._save_cursor()
                await self._save_changes_cursor()
            except Exception as exc:
                log.warning("flow.cursor_save_failed", error=str(exc)[:300])
