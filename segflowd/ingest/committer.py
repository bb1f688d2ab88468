"""Group commit: many requests' writes made durable in one transaction per flush.

A request hands its writes to :meth:`GroupCommitter.submit` and waits. One task takes
whatever is queued — after ``FLUSH_DELAY`` seconds, or at once when ``FLUSH_ROWS``
writes wait — and commits it all in one transaction. Only then does ``submit``
return, so a 2xx always means "committed". If the store is down every waiting
request gets :class:`~segflowd.errors.StoreUnavailable` (HTTP 503) and nothing of the
flush is written; the next flush simply tries again. If one request's writes break
the transaction (bad data the parser let through), the flush is retried request by
request so only that request fails.

The writes themselves, and the statements one flush makes of them, are in
:mod:`segflowd.ingest.writes`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Sequence

import anyio
import structlog
from anyio.abc import TaskStatus
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..clock import Clock
from ..errors import IngestError, StoreUnavailable
from ..hooks import IngestBatch, IngestSink
from ..store import Store, is_unavailable
from .eventinsert import EventInserter
from .writes import CommitResult, Write, apply_writes, events_only

__all__ = ["CommitterStatistics", "GroupCommitter"]

log = structlog.get_logger("segflowd.committer")

FLUSH_DELAY = 0.002  # seconds a flush waits for more writes to join it
FLUSH_ROWS = 1000  # writes that start a flush at once
KNOWN_USERS_MAX = 200_000  # user ids remembered as existing (about 20 MB at most)
SMALL_FLUSH = 100  # writes: under load, a flush smaller waits for the clients just answered
QUEUE_LIMIT = 50_000  # writes waiting before submit() answers "unavailable" (back-pressure)
IDLE_RELEASE = 1.0  # seconds without a flush before the held connection goes back to the pool
RELEASE_TIMEOUT = 5.0  # seconds giving the connection back may take


@dataclasses.dataclass(frozen=True)
class CommitterStatistics:
    flushes: int
    writes: int
    events_stored: int
    duplicates: int
    failed_flushes: int
    pending: int
    last_flush_rows: int
    last_flush_ms: float | None
    max_flush_rows: int


class _Pending:
    """One request's writes and the future its handler awaits.

    A bare asyncio future rather than ``anyio.Event`` in a shielded scope: the daemon runs
    on anyio's asyncio backend, and this is per request on the ingest hot path (0.2 µs
    against 7 µs). A handler cancelled while waiting leaves the future cancelled; its
    writes stay in the flush and are committed (or not) with it all the same.
    """

    __slots__ = ("future", "writes")

    def __init__(self, writes: Sequence[Write], future: asyncio.Future[CommitResult]) -> None:
        self.writes = writes
        self.future = future

    def resolve(self, result: CommitResult) -> None:
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class GroupCommitter:
    """Commits queued writes in groups; tells ``sinks`` what each commit made durable."""

    def __init__(self, store: Store, clock: Clock, sinks: Sequence[IngestSink] = (), *,
                 flush_delay: float = FLUSH_DELAY, flush_rows: int = FLUSH_ROWS,
                 forget_window: float | None = None) -> None:
        self.store = store
        self.clock = clock
        self.sinks = sinks  # shared by reference: sinks appended later are told too
        self.flush_delay = flush_delay
        self.flush_rows = flush_rows
        # Seconds a forgotten user's later writes are refused (CommitResult.refused);
        # None: not checked (the ingest service passes the configured window).
        self.forget_window = forget_window
        self.on_commit: list[Callable[[IngestBatch], None]] = []  # told after the sinks
        self._queue: list[_Pending] = []
        self._queued_writes = 0
        self._wake = anyio.Event()
        self._closed = False
        self._running = False
        self._flushes = self._writes = self._stored = self._dups = self._failed = 0
        self._last_rows = self._max_rows = 0
        self._last_ms: float | None = None
        self._returning: bool | None = None
        self._events_insert: EventInserter | None = None
        # The connection flushes use while writes keep coming: one pool checkout (pre-ping,
        # reset on return) per busy spell instead of per flush. Given back after
        # IDLE_RELEASE seconds without a flush, and at once after any failed flush.
        self._conn: AsyncConnection | None = None
        # Users known to exist, so an event of theirs needs no INSERT IGNORE of the user.
        # This process is the only one that creates or forgets users in this store.
        self._known: set[str] = set()
        # Requests in the last flush: a batching window closes early once as many have
        # joined (clients waiting on one flush come back together).
        self._expect = 1

    # -- callers ---------------------------------------------------------------------

    async def submit(self, writes: Sequence[Write]) -> CommitResult:
        """Queue ``writes``; return once they are committed (all of them or none)."""
        if self._closed or not self._running:
            raise StoreUnavailable("ingest is not accepting writes (starting or stopping)")
        if self._queued_writes >= QUEUE_LIMIT:
            raise StoreUnavailable("ingest queue is full; retry later")
        future: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(writes, future))
        self._queued_writes += len(writes)
        if (self._queued_writes >= self.flush_rows or len(self._queue) == 1
                or len(self._queue) == self._expect):
            self._wake.set()
        return await future

    def statistics(self) -> CommitterStatistics:
        return CommitterStatistics(
            flushes=self._flushes, writes=self._writes, events_stored=self._stored,
            duplicates=self._dups, failed_flushes=self._failed, pending=self._queued_writes,
            last_flush_rows=self._last_rows, last_flush_ms=self._last_ms,
            max_flush_rows=self._max_rows,
        )

    # -- the flushing task -----------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Flush until cancelled (or closed and empty)."""
        self._running = True
        task_status.started()
        backlog = False  # writes arrived while the last flush ran: under load
        cycle = 0  # requests of the last flush and those that queued up during it
        try:
            while not (self._closed and not self._queue):
                if self._conn is not None and not self._wake.is_set():
                    with anyio.move_on_after(IDLE_RELEASE):
                        await self._wake.wait()
                    if not self._wake.is_set():
                        await self._release()  # idle: the pool checks it before next use
                await self._wake.wait()
                self._wake = anyio.Event()
                if not self._queue:
                    continue
                if not backlog:
                    target = self._expect
                else:
                    target = cycle if self._queued_writes < SMALL_FLUSH else 0
                if (self._queued_writes < self.flush_rows and not self._closed
                        and len(self._queue) < target):
                    # Let concurrent requests join this flush. Coming out of idle: as many
                    # as joined the last one. Under load, while the flush is small: the
                    # clients the last flush just answered too, or the two halves of the
                    # load flush in turn, each paying a transaction for half the rows.
                    # Real time on purpose: a batching window, not a time the data sees.
                    self._expect = target
                    with anyio.move_on_after(self.flush_delay):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                batch, self._queue, self._queued_writes = self._queue, [], 0
                self._expect = len(batch)
                try:
                    await self._flush(batch)
                finally:
                    for p in batch:  # cancelled mid-flush: nobody may wait forever
                        p.fail(StoreUnavailable("ingest stopped during the commit"))
                backlog = bool(self._queue)
                cycle = len(batch) + len(self._queue)
        finally:
            self._running = False
            for p in self._queue:
                p.fail(StoreUnavailable("ingest stopped before this write was committed"))
            self._queue = []
            await self._release()

    async def close(self) -> None:
        """Stop taking writes; the run task flushes what is queued and returns."""
        self._closed = True
        self._wake.set()

    async def _flush(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        rows = sum(len(p.writes) for p in batch)
        try:
            results, ingest = await self._commit([p.writes for p in batch])
        except Exception as exc:
            self._failed += 1
            if is_unavailable(exc):
                self.store.note_unavailable(str(exc).splitlines()[0][:300])
            if is_unavailable(exc) or len(batch) == 1:
                err = _as_request_error(exc)
                log.warning("ingest.flush_failed", rows=rows, requests=len(batch),
                            error=str(err))
                for p in batch:
                    p.fail(err)
                return
            # One request's data broke the transaction: commit each request alone.
            for p in batch:
                await self._flush([p])
            return
        for p, r in zip(batch, results, strict=True):
            p.resolve(r)
        self.store.note_available()
        elapsed = (time.perf_counter() - started) * 1000
        self._flushes += 1
        self._writes += rows
        self._stored += sum(not d for r in results for d in r.duplicates)
        if len(self._known) > KNOWN_USERS_MAX:
            self._known.clear()
        self._known.update(ingest.users)  # the deleted leave it in announce()
        self._dups += sum(sum(r.duplicates) for r in results)
        self._last_rows, self._last_ms = rows, elapsed
        self._max_rows = max(self._max_rows, rows)
        if ingest.events or ingest.users or ingest.deleted:
            self.announce(ingest)

    def unknown(self, user_id: str) -> None:
        """Stop taking ``user_id`` for an existing user: its next write makes the user
        again if need be (a merge is about to delete it)."""
        self._known.discard(user_id)

    def announce(self, ingest: IngestBatch) -> None:
        """Tell the sinks and hooks what a commit wrote (a write made beside the
        committer, such as a merge of two people, announces itself through this too)."""
        self._known.difference_update(ingest.deleted)  # its cache of existing users
        for sink in list(self.sinks):
            try:
                sink.ingested(ingest)
            except Exception:
                log.exception("ingest.sink_failed", sink=type(sink).__name__)
        for hook in list(self.on_commit):
            hook(ingest)

    async def _commit(self, groups: list[Sequence[Write]]
                      ) -> tuple[list[CommitResult], IngestBatch]:
        # Bounded as a whole (connect, statements, COMMIT): a server that stopped
        # answering fails the flush with 503s instead of holding every request. The
        # cancelled transaction's connection is dropped (_commit_once), never reused.
        # SQLite's waits are bounded by its busy timeout instead.
        # asyncio's timeout, not anyio's: a third of the cost, paid on every flush.
        bound = None if self.store.dialect == "sqlite" else self.store.timeout
        try:
            async with asyncio.timeout(bound):
                try:
                    return await self._commit_once(groups)
                except IntegrityError:
                    # Another process stored a dedupe key between our check and our
                    # insert; the retry sees it and treats it as the duplicate it is.
                    return await self._commit_once(groups)
        except TimeoutError:
            if bound is None:  # the driver's own (an OSError): is_unavailable() knows it
                raise
            raise StoreUnavailable(f"store unavailable: no answer to the commit within "
                                   f"{bound:g} s") from None

    async def _commit_once(self, groups: list[Sequence[Write]]
                           ) -> tuple[list[CommitResult], IngestBatch]:
        now = self.clock.now()
        conn = self._conn
        if conn is None:
            conn = self._conn = await self.store.engine.connect()
        inserter = self._inserter(conn)
        since = (None if self.forget_window is None
                 else now - dt.timedelta(seconds=self.forget_window))
        check = self.forget_window is not None
        try:
            if inserter.commits_alone and events_only(groups, self._known):
                # The flush is the events INSERT and nothing else: the inserter makes it a
                # transaction of its own, in one trip to SQLite's thread instead of five.
                return await apply_writes(self.store, conn, groups, now, True, self._known,
                                          inserter, alone=True, forgotten_since=since,
                                          refuse_forgotten=check)
            async with conn.begin():
                return await apply_writes(self.store, conn, groups, now,
                                          self._can_return(conn), self._known, inserter,
                                          forgotten_since=since, refuse_forgotten=check)
        except BaseException as exc:
            # Whatever broke (or cancelled) the flush, the next one starts on a checked
            # connection from the pool.
            await self._release(broken=not isinstance(exc, Exception) or is_unavailable(exc))
            raise

    async def _release(self, *, broken: bool = False) -> None:
        """Give the held connection back to the pool (dropped if it may be broken)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Shielded (a cancelled flush still returns its connection) but bounded: a store
        # that stopped answering must not hold up a shutdown.
        with anyio.move_on_after(RELEASE_TIMEOUT, shield=True):
            try:
                if broken:
                    await conn.invalidate()
                await conn.close()
            except Exception as exc:  # a dead connection may fail to close: it is gone
                log.debug("ingest.connection_close_failed", error=str(exc).splitlines()[0][:200])

    def _inserter(self, conn: AsyncConnection) -> EventInserter:
        if self._events_insert is None:
            self._events_insert = EventInserter(self.store, conn.dialect)
        return self._events_insert

    def _can_return(self, conn: AsyncConnection) -> bool:
        if self._returning is None:
            d = conn.dialect
            self._returning = bool(d.insert_executemany_returning_sort_by_parameter_order)
        return self._returning



def _as_request_error(exc: BaseException) -> BaseException:
    if isinstance(exc, StoreUnavailable):
        return exc
    if is_unavailable(exc):
        return StoreUnavailable(f"store unavailable: {str(exc).splitlines()[0][:200]}")
    if isinstance(exc, IngestError):
        return exc
    # The database's own words name tables and drivers: they go to the log, not the client.
    log.warning("ingest.refused", error=str(exc).splitlines()[0][:300])
    return IngestError("the store refused the data (a value it cannot hold); nothing of "
                       "this request was stored")
