"""Goals: a campaign's goal event, arriving within its window after one of the campaign's
messages to the user, is a conversion (``Segflow.campaign(goal=("purchase", "7d"))``).

For each committed event whose name is some campaign's goal, and each campaign with that
goal, the campaign's most recent *sent* message to the user with
``sent_at <= event.created_at <= sent_at + window`` gets one ``conversions`` row (its
template and variant copied; ``converted_at`` is the event's time). A message converts
once (``uq_conversions_message``, written with an INSERT that skips a duplicate), so a
second goal event, or the same event handed over twice, converts nothing more. Two
campaigns with the same goal each attribute the event to their own message. With
``exit_on_goal=True`` the conversion also ends the user's live instance of the campaign
(``exited``, conditional as a dynamic exit is: :func:`~segflowd.flows.entries.end_live`).

Durability follows the transactions engine (:mod:`segflowd.segments.transactions`): the
fast path is ingest's hand-off of each commit, in commit order; the conversions, the
exits and the durable cursor (``engine_cursors`` row ``goals``) are written in **one**
store transaction per batch, so a crash either keeps all of a batch or none of it, and
the catch-up at start (events after the cursor, up to the highest id stored before
ingest opens) finds exactly what was not written. The store is read past the cursor only
at start, before anything else writes events: at run time an uncommitted lower id (two
MariaDB transactions committing out of id order) can never be skipped by a read that
saw a higher one. An event handed over again (ingest re-delivers one whose commit's
reply was lost, below ids announced since) is processed again, and converts only if it
did not before: once per event and campaign, once per message.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
import sqlalchemy as sa
import structlog
from anyio.abc import TaskStatus
from sqlalchemy.ext.asyncio import AsyncConnection

from ..app import CampaignDef
from ..cursors import SAVE_INTERVAL, Cursor, load_cursor, max_event_id, save_cursor
from ..errors import StoreUnavailable
from ..hooks import IngestBatch, StoredEvent
from ..http import Router
from ..schema import conversions, events, messages
from ..store import is_unavailable
from .entries import end_live

if TYPE_CHECKING:
    from ..kernel import Kernel
    from .service import FlowService

__all__ = ["CONVERSIONS_METRIC", "CURSOR_NAME", "GoalService", "GoalStatistics"]

log = structlog.get_logger("segflowd.goals")

GOAL_BATCH = 500  # goal events converted per store transaction
RETRY_DELAY = 1.0  # seconds before trying a batch again after a store failure
CURSOR_NAME = "goals"  # the engine_cursors row of the goals engine
CONVERSIONS_METRIC = "segflow_conversions_total"


@dataclasses.dataclass(frozen=True)
class GoalStatistics:
    converted: int  # conversions recorded
    duplicates: int  # goal events whose message had converted already
    unattributed: int  # (event, campaign) pairs with no sent message within the window
    exited: int  # live instances ended by exit_on_goal
    pending: int  # goal events waiting to be processed
    last_event_id: int  # the cursor: every event up to here is done


@dataclasses.dataclass(frozen=True)
class _Converted:
    campaign: str
    user_id: str
    message_id: int
    template: str | None
    variant: str | None
    event_id: int
    event_name: str
    exited: tuple[int, dt.datetime | None] | None  # the instance exit_on_goal ended


class GoalService:
    """Records conversions of campaigns' goal events; a daemon service (made only when
    some campaign has a goal). ``flows`` ends instances for ``exit_on_goal``."""

    name = "goals"

    def __init__(self, kernel: Kernel, *, flows: FlowService | None = None) -> None:
        self.k = kernel
        self.flows = flows
        self._by_event: dict[str, list[CampaignDef]] = {}
        for c in kernel.app.campaigns.values():
            if c.goal is not None:
                self._by_event.setdefault(c.goal.event, []).append(c)
        self._queue: collections.deque[StoredEvent] = collections.deque()
        self._queued: set[int] = set()  # ids in the queue (or its batch in flight)
        self._wake = anyio.Event()
        self._seen_event_id = 0  # the highest event id handed over (or caught up to)
        self._saved_event_id = 0  # the cursor as stored
        self._saved_at = -math.inf  # time.monotonic() of the last save by _save_seen
        self._started = False
        self._inflight = 0  # batches being processed (not in the queue, not done)
        # One caller processes at a time: the daemon drains while the run loop runs, and
        # a batch committed (with its cursor) past one still in flight would move the
        # cursor over that one's events, lost if it then fails or the process is killed.
        self._processing = anyio.Lock()
        self._counts = collections.Counter[str]()
        kernel.stats["goals"] = self.statistics
        kernel.metrics.describe(CONVERSIONS_METRIC, "counter",
                                "goal conversions recorded, by campaign")

    @staticmethod
    def wanted(kernel: Kernel) -> bool:
        """Whether the app has a campaign with a goal (the Simulation makes the service
        only then; the daemon always runs it, to keep its cursor current)."""
        return any(c.goal is not None for c in kernel.app.campaigns.values())

    # -- service ---------------------------------------------------------------------

    def register_routes(self, router: Router) -> None:
        """No HTTP routes: conversions come from ingested events."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.start()
        task_status.started()
        while True:
            if self._seen_event_id > self._saved_event_id:  # a cursor save is owed
                with anyio.move_on_after(SAVE_INTERVAL):
                    await self._wake.wait()
            else:
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self.process_pending()
            except Exception as exc:
                # Nothing of the batch was written (one transaction): it is still queued.
                # A deadlock with a step, or an outage: try again shortly.
                log.warning("goals.process_failed", error=str(exc)[:300],
                            pending=len(self._queue), retry_in_s=RETRY_DELAY,
                            unavailable=is_unavailable(exc)
                            or isinstance(exc, StoreUnavailable))
                await self.k.clock.sleep(RETRY_DELAY)
                self._wake.set()

    async def drain(self) -> None:
        """Convert what is queued; anything left is caught up from the cursor at start."""
        try:
            await self.process_pending()
            await self._save_seen(force=True)
        except Exception as exc:
            log.warning("goals.drain_incomplete", pending=len(self._queue),
                        error=str(exc)[:300])

    def ingested(self, batch: IngestBatch) -> None:
        """Queue the batch's goal events and wake the worker; returns at once.

        Every one, even below ids handed over before: ingest hands over again, as stored,
        an event whose first commit's reply was lost (it was never announced); processing
        an event twice converts nothing more (one conversion per event and campaign)."""
        for e in batch.events:
            self._seen_event_id = max(self._seen_event_id, e.id)
            if (e.user_id is not None and e.name in self._by_event
                    and e.id not in self._queued):
                self._queue.append(e)
                self._queued.add(e.id)
        if batch.events:
            self._wake.set()

    # -- work ------------------------------------------------------------------------

    async def start(self) -> None:
        """Catch up: convert goal events committed after the stored cursor. Called before
        ingest opens, so the highest id read here has no uncommitted id below it."""
        if self._started:
            return
        self._started = True
        async with self.k.store.begin() as conn:
            cursor = await load_cursor(conn, CURSOR_NAME)
            top = await max_event_id(conn)
            if cursor is None:
                # First run against this store: history is not converted.
                await save_cursor(conn, CURSOR_NAME, Cursor(top, None), self.k.clock.now())
                self._saved_event_id = top
            else:
                self._saved_event_id = cursor.last_event_id
        self._seen_event_id = max(self._seen_event_id, top)
        last = self._saved_event_id
        caught = 0
        names = sorted(self._by_event)
        while names and last < top:
            async with self.k.store.connect() as conn:
                rows = (await conn.execute(
                    sa.select(events).where(events.c.id > last, events.c.id <= top,
                                            events.c.name.in_(names),
                                            events.c.user_id.is_not(None))
                    .order_by(events.c.id).limit(GOAL_BATCH))).all()
            if not rows:
                break
            batch = [StoredEvent(id=int(r.id), user_id=r.user_id, anonymous_id=r.anonymous_id,
                                 name=r.name, attributes=dict(r.attributes or {}),
                                 created_at=r.created_at, received_at=r.received_at)
                     for r in rows]
            await self.process(batch)
            last = batch[-1].id
            caught += len(batch)
        if caught:
            log.info("goals.catch_up", events=caught, up_to_event_id=top)
        await self._save_seen(force=True)

    async def process_pending(self) -> None:
        """Process every queued goal event (in batches of :data:`GOAL_BATCH`), in order:
        a second caller waits for the first."""
        async with self._processing:
            while self._queue:
                batch = [self._queue.popleft()
                         for _ in range(min(GOAL_BATCH, len(self._queue)))]
                self._inflight += 1
                try:
                    await self.process(batch)
                except BaseException:
                    self._queue.extendleft(reversed(batch))
                    raise
                finally:
                    self._inflight -= 1
                self._queued.difference_update(e.id for e in batch)
            await self._save_seen()

    async def process(self, batch: Sequence[StoredEvent]) -> int:
        """Record the conversions of ``batch`` and move the cursor past it, in one
        transaction; the number of conversions recorded."""
        now = self.k.clock.now()
        made: list[_Converted] = []
        with anyio.CancelScope(shield=True):  # finished, not abandoned, on shutdown
            async with self.k.store.begin() as conn:
                stored = await _still_stored(
                    conn, [e.id for e in batch if e.user_id is not None])
                for e in batch:
                    # The user as stored now: a merge since the hand-off moved the event
                    # (and the messages) to the primary; gone: forgotten since.
                    uid = stored.get(e.id)
                    if e.user_id is None or uid is None:
                        continue  # anonymous, or forgotten since: nobody converts
                    for c in self._by_event.get(e.name, ()):
                        found = await self._convert(conn, c, e, uid, now)
                        if found is not None:
                            made.append(found)
                top = max((e.id for e in batch), default=0)
                if top > self._saved_event_id:
                    await save_cursor(conn, CURSOR_NAME, Cursor(top, None), now)
        if batch:
            self._saved_event_id = max(self._saved_event_id, max(e.id for e in batch))
        for m in made:
            self._counts["converted"] += 1
            self.k.metrics.inc(CONVERSIONS_METRIC, campaign=m.campaign)
            log.info("goal.converted", campaign=m.campaign, user_id=m.user_id,
                     message_id=m.message_id, template=m.template, variant=m.variant,
                     event_id=m.event_id)
            self.k.bus.publish("goal.converted", campaign=m.campaign, user_id=m.user_id,
                               message_id=m.message_id, template=m.template,
                               variant=m.variant, event_id=m.event_id, event=m.event_name)
            if m.exited is not None and self.flows is not None:
                self._counts["exited"] += 1
                self.flows.exited(m.campaign, m.user_id, *m.exited, reason="goal")
        return len(made)

    async def _convert(self, conn: AsyncConnection, c: CampaignDef, e: StoredEvent,
                       user_id: str, now: dt.datetime) -> _Converted | None:
        assert c.goal is not None  # only campaigns with a goal are indexed
        m = messages.c
        # A message the user got: a webhook call (rt.webhook) is "sent" too, to a server.
        query = sa.select(m.id, m.template, m.variant).where(
            m.campaign == c.name, m.user_id == user_id, m.channel != "webhook",
            m.sent_at.is_not(None), m.sent_at <= e.created_at)
        # A window reaching past year 1 (or infinite): no lower bound.
        with contextlib.suppress(OverflowError, ValueError):
            query = query.where(m.sent_at >= e.created_at - dt.timedelta(seconds=c.goal.window))
        row = (await conn.execute(
            query.order_by(m.sent_at.desc(), m.id.desc()).limit(1))).first()
        if row is None:
            self._counts["unattributed"] += 1
            return None
        cv = conversions.c
        if (await conn.execute(sa.select(cv.id).where(  # handed over again: done before
                cv.campaign == c.name, cv.converted_at == e.created_at,
                cv.event_id == e.id).limit(1))).first() is not None:
            self._counts["duplicates"] += 1
            return None
        done = await conn.execute(self.k.store.insert_ignore(conversions).values(
            campaign=c.name, message_id=int(row.id), user_id=user_id,
            template=row.template, variant=row.variant, event_id=e.id,
            event_name=e.name, converted_at=e.created_at))
        if done.rowcount != 1:
            self._counts["duplicates"] += 1  # this message converted before
            return None
        ended = None
        if c.exit_on_goal and self.flows is not None:
            ended = await end_live(conn, c.name, user_id, now)
        return _Converted(c.name, user_id, int(row.id), row.template, row.variant,
                          e.id, e.name, ended)

    async def _save_seen(self, *, force: bool = False) -> None:
        """Save the last event seen as the cursor: at most every SAVE_INTERVAL seconds
        (the run loop comes back for a save it put off), or now with ``force``."""
        # Events up to the last one seen either were no goal or were processed above.
        if (self._queue or self._inflight
                or self._seen_event_id <= self._saved_event_id):
            return
        if not force and time.monotonic() - self._saved_at < SAVE_INTERVAL:
            return
        seen = self._seen_event_id
        async with self.k.store.begin() as conn:
            await save_cursor(conn, CURSOR_NAME, Cursor(seen, None), self.k.clock.now())
        self._saved_event_id = max(self._saved_event_id, seen)
        self._saved_at = time.monotonic()

    def statistics(self) -> GoalStatistics:
        c = self._counts
        return GoalStatistics(
            converted=c["converted"], duplicates=c["duplicates"],
            unattributed=c["unattributed"], exited=c["exited"], pending=len(self._queue),
            last_event_id=self._saved_event_id)


async def _still_stored(conn: AsyncConnection, event_ids: Sequence[int]
                        ) -> dict[int, str | None]:
    """Those of ``event_ids`` still stored, with their user id as stored now: a forget
    deletes its user's events, a merge moves the secondary's to the primary.

    On MySQL the rows are read ``FOR SHARE``, so a forget or a merge racing this
    transaction either waits for it (a forget then clears the user id of the conversions
    it made) or is seen to have happened (SQLite's write transactions do not overlap)."""
    if not event_ids:
        return {}
    query = sa.select(events.c.id, events.c.user_id).where(
        events.c.id.in_(sorted(set(event_ids))))
    if conn.dialect.name in ("mysql", "mariadb"):
        query = query.order_by(events.c.id).with_for_update(read=True)
    return {int(i): u for i, u in await conn.execute(query)}
