"""Transactions: an event whose name a transaction names sends its template to the user.

For each committed event and each transaction of its name, one message row is enqueued
in the outbox with ``dedupe_key = "tx:<event id>:<transaction>"``, so an event handed
over twice (ingest's fast path, then the catch-up after a restart) is sent once. The
template context has ``event`` (name, attributes, created_at).

Transactional mail goes out while the user is unsubscribed from marketing (delivery checks
the topic only for campaign mail). It never goes to a suppressed address: such a row is
recorded with status ``suppressed`` instead of ``queued`` so the operator sees it, and a
user with no email address gets a ``failed`` row saying so. An event whose user no
longer exists when it is processed (forgotten in between) enqueues nothing: the user's
row is read in the enqueue's transaction.

The enqueue and the durable cursor (``engine_cursors``, name ``transactions``) are
written in one store transaction; at start, events committed after the cursor are
processed before anything new.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import math
import time
from collections.abc import Sequence

import anyio
import sqlalchemy as sa
import structlog
from anyio.abc import TaskStatus
from sqlalchemy.ext.asyncio import AsyncConnection

from ..cursors import SAVE_INTERVAL, Cursor, load_cursor, max_event_id, save_cursor
from ..delivery.outbox import enqueue
from ..errors import StoreUnavailable
from ..hooks import IngestBatch, OutboxWaker, StoredEvent
from ..http import Router
from ..kernel import Kernel
from ..schema import events, messages, suppressions, users
from ..store import is_unavailable
from .query import db_message

__all__ = ["TransactionService", "TransactionStatistics"]

log = structlog.get_logger("segflowd.transactions")

TX_BATCH = 500  # events enqueued per store transaction
RETRY_DELAY = 1.0  # seconds before retrying when the store was unavailable
CURSOR_NAME = "transactions"
NO_EMAIL = "user has no email address"


@dataclasses.dataclass(frozen=True)
class TransactionStatistics:
    queued: int  # messages enqueued for delivery
    suppressed: int  # recorded, not sent: the address is suppressed
    failed: int  # recorded, not sent: the user has no email address
    duplicates: int  # (event, transaction) pairs already enqueued before
    no_user: int  # matching events of anonymous visitors: nobody to send to
    forgotten: int  # matching events of users forgotten before they were processed
    pending: int  # events waiting to be processed
    last_event_id: int  # the cursor: every event up to here is done


class TransactionService:
    """Enqueues transactional messages for matching events; a daemon service."""

    name = "transactions"

    def __init__(self, kernel: Kernel, *, wakers: Sequence[OutboxWaker] = ()) -> None:
        self.k = kernel
        self.wakers = wakers  # shared by reference with the daemon's list
        self._queue: collections.deque[StoredEvent] = collections.deque()
        self._names = {t.event for t in kernel.app.transactions.values()}
        self._wake = anyio.Event()
        self._seen_event_id = 0
        self._saved_event_id = 0
        self._saved_at = -math.inf  # time.monotonic() of the last save by _save_seen
        self._started = False
        self._counts = collections.Counter[str]()
        kernel.stats["transactions"] = self.statistics

    # -- service ---------------------------------------------------------------------

    def register_routes(self, router: Router) -> None:
        """No HTTP routes: transactions are triggered by ingested events."""

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
                if not (is_unavailable(exc) or isinstance(exc, StoreUnavailable)):
                    raise
                log.warning("transactions.store_unavailable", error=db_message(exc),
                            retry_in_s=RETRY_DELAY)
                await self.k.clock.sleep(RETRY_DELAY)
                self._wake.set()

    async def drain(self) -> None:
        """Enqueue what is queued; anything left is caught up from the cursor at start."""
        try:
            await self.process_pending()
            await self._save_seen(force=True)
        except Exception as exc:
            log.warning("transactions.drain_incomplete", pending=len(self._queue),
                        error=db_message(exc))

    def ingested(self, batch: IngestBatch) -> None:
        """Queue the batch's matching events and wake the worker; returns at once."""
        for e in batch.events:
            self._seen_event_id = max(self._seen_event_id, e.id)
            if e.name in self._names:
                self._queue.append(e)
        if batch.events:
            self._wake.set()

    # -- work ------------------------------------------------------------------------

    async def start(self) -> None:
        """Catch up: process matching events committed after the stored cursor."""
        if self._started:
            return
        self._started = True
        async with self.k.store.begin() as conn:
            cursor = await load_cursor(conn, CURSOR_NAME)
            top = await max_event_id(conn)
            if cursor is None:
                # First run against this store: history is not re-sent.
                await save_cursor(conn, CURSOR_NAME, Cursor(top, None), self.k.clock.now())
                self._saved_event_id = top
            else:
                self._saved_event_id = cursor.last_event_id
        self._seen_event_id = max(self._seen_event_id, top)
        last = self._saved_event_id
        caught = 0
        while self._names and last < top:
            async with self.k.store.connect() as conn:
                rows = (await conn.execute(
                    sa.select(events).where(events.c.id > last, events.c.id <= top,
                                            events.c.name.in_(sorted(self._names)))
                    .order_by(events.c.id).limit(TX_BATCH))).all()
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
            log.info("transactions.catch_up", events=caught, up_to_event_id=top)
        await self._save_seen(force=True)

    async def process_pending(self) -> None:
        """Process every queued event (in batches of :data:`TX_BATCH`)."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(TX_BATCH, len(self._queue)))]
            try:
                await self.process(batch)
            except BaseException:
                self._queue.extendleft(reversed(batch))
                raise
        await self._save_seen()

    async def process(self, batch: Sequence[StoredEvent]) -> list[int]:
        """Enqueue the transactions of ``batch``; the ids of the message rows made."""
        now = self.k.clock.now()
        made: list[tuple[int, str, str, int, str]] = []
        with anyio.CancelScope(shield=True):  # finished, not abandoned, on shutdown
            async with self.k.store.begin() as conn:
                for_users = sorted({e.user_id for e in batch if e.user_id is not None})
                emails = await _emails(conn, for_users)
                stored = await _still_stored(conn, [e.id for e in batch])
                blocked = await _suppressed(conn, [a for a in emails.values() if a])
                for e in batch:
                    for t in self.k.app.transactions_for(e.name):
                        if e.user_id is None:
                            self._counts["no_user"] += 1
                            log.info("transaction.no_user", transaction=t.name, event_id=e.id)
                            continue
                        if e.user_id not in emails or e.id not in stored:
                            # Forgotten after the event was committed (their events went
                            # with them; the id may be a new user's by now): a message
                            # row would bring back the event's data, or mail a stranger.
                            self._counts["forgotten"] += 1
                            log.info("transaction.forgotten", transaction=t.name,
                                     event_id=e.id)
                            continue
                        sms = t.template in self.k.app.sms_templates
                        mid = await enqueue(
                            conn, kind="transaction", template=t.template, now=now,
                            user_id=e.user_id, dedupe_key=f"tx:{e.id}:{t.name}",
                            transaction=t.name, data={"event": _event_context(e)},
                            channel="sms" if sms else "email")
                        if mid is None:
                            self._counts["duplicates"] += 1
                            continue
                        # An SMS's number is checked by delivery (segflowd.delivery.sms).
                        status = "queued" if sms else await _settle(
                            conn, mid, emails.get(e.user_id), blocked, now)
                        made.append((mid, t.name, e.user_id, e.id, status))
                top = max(e.id for e in batch) if batch else 0
                if top > self._saved_event_id:
                    await save_cursor(conn, CURSOR_NAME, Cursor(top, None), now)
        if batch:
            self._saved_event_id = max(self._saved_event_id, max(e.id for e in batch))
        for mid, tx, uid, eid, status in made:
            self._counts[status] += 1
            log.info("transaction." + status, transaction=tx, user_id=uid, event_id=eid,
                     message_id=mid)
            self.k.bus.publish("transaction." + status, transaction=tx, user_id=uid,
                               event_id=eid, message_id=mid)
        if any(status == "queued" for *_, status in made):
            for waker in list(self.wakers):
                waker.wake()
        return [mid for mid, *_ in made]

    async def _save_seen(self, *, force: bool = False) -> None:
        """Save the last event seen as the cursor: at most every SAVE_INTERVAL seconds
        (the run loop comes back for a save it put off), or now with ``force``."""
        # Events up to the last one seen either matched nothing or were processed above.
        if self._queue or self._seen_event_id <= self._saved_event_id:
            return
        if not force and time.monotonic() - self._saved_at < SAVE_INTERVAL:
            return
        seen = self._seen_event_id
        async with self.k.store.begin() as conn:
            await save_cursor(conn, CURSOR_NAME, Cursor(seen, None), self.k.clock.now())
        self._saved_event_id = max(self._saved_event_id, seen)
        self._saved_at = time.monotonic()

    def statistics(self) -> TransactionStatistics:
        c = self._counts
        return TransactionStatistics(
            queued=c["queued"], suppressed=c["suppressed"], failed=c["failed"],
            duplicates=c["duplicates"], no_user=c["no_user"], forgotten=c["forgotten"],
            pending=len(self._queue),
            last_event_id=self._saved_event_id)


def _event_context(e: StoredEvent) -> dict[str, object]:
    return {"id": e.id, "name": e.name, "attributes": dict(e.attributes),
            "created_at": e.created_at.isoformat() + "Z"}


async def _emails(conn: AsyncConnection, user_ids: Sequence[str]) -> dict[str, str | None]:
    if not user_ids:
        return {}
    rows = await conn.execute(sa.select(users.c.id, users.c.email)
                              .where(users.c.id.in_(list(user_ids))))
    return {str(r[0]): r[1] for r in rows}


async def _still_stored(conn: AsyncConnection, event_ids: Sequence[int]) -> set[int]:
    """Those of ``event_ids`` still stored: a forget deletes its user's events.

    On MySQL the rows are read ``FOR SHARE``, so a forget racing this transaction either
    waits for it (and then clears the messages it made) or is seen to have happened."""
    query = sa.select(events.c.id).where(events.c.id.in_(sorted(set(event_ids))))
    if conn.dialect.name in ("mysql", "mariadb"):
        query = query.order_by(events.c.id).with_for_update(read=True)
    return {int(i) for i in (await conn.execute(query)).scalars()} if event_ids else set()


async def _suppressed(conn: AsyncConnection, addresses: Sequence[str]) -> dict[str, str]:
    lowered = sorted({a.strip().lower() for a in addresses})
    if not lowered:
        return {}
    rows = await conn.execute(sa.select(suppressions.c.address, suppressions.c.reason)
                              .where(suppressions.c.address.in_(lowered)))
    return {str(r[0]): str(r[1]) for r in rows}


async def _settle(conn: AsyncConnection, message_id: int, email: str | None,
                  blocked: dict[str, str], now: dt.datetime) -> str:
    """Mark a just-queued row suppressed or failed where it must not be sent; its status."""
    if not email:
        values: dict[str, object] = {"status": "failed", "last_error": NO_EMAIL,
                                     "next_attempt_at": None}
    elif email.strip().lower() in blocked:
        reason = blocked[email.strip().lower()]
        values = {"status": "suppressed", "to_address": email, "next_attempt_at": None,
                  "last_error": f"the address is suppressed ({reason})"}
    else:
        return "queued"
    await conn.execute(sa.update(messages).where(messages.c.id == message_id)
                       .values(updated_at=now, **values))
    return str(values["status"])
