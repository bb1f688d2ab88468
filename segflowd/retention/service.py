"""The retention service: a pass every ``[retention] interval`` prunes finished data older
than its age, in batches of ``batch_size`` rows with a pause between them.

A pass reads its guards (:mod:`.rules`), then walks instances, messages, segment
changes and events in that order (:mod:`.prune`); a kind kept ``"forever"`` is not
walked. Each pass logs ``retention.pruned`` with its counts; ``statistics()`` and the
``segflow_retention_*`` counters add them up. A pass the store cuts short is logged
(``retention.store_unavailable``) and the next one begins after the interval: each
batch committed on its own, so nothing is left half-pruned. Draining lets the batch in
flight commit and starts no other.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import time

import anyio
import structlog
from anyio.abc import TaskStatus

from ..errors import StoreUnavailable
from ..http import Router
from ..kernel import Kernel
from ..store import is_unavailable
from .prune import KINDS, Pruner
from .rules import load_guards

__all__ = ["RetentionPass", "RetentionService", "RetentionStatistics"]

log = structlog.get_logger("segflowd.retention")

BATCH_PAUSE = 0.05  # seconds between two batches: ingest and flows get the store
FIRST_PASS_DELAY = 60.0  # seconds after start: catch-ups run before the first pass


@dataclasses.dataclass(frozen=True)
class RetentionPass:
    """The rows one pass deleted."""

    instances: int  # flow instance rows
    journal_rows: int  # flow_journal rows (of deleted instances and of kept entry records)
    messages: int
    engagement: int  # opens and clicks of those messages
    segment_changes: int
    events: int
    tombstones: int  # ``forgotten`` rows past ``forget_window``
    seconds: float
    complete: bool  # False when a drain stopped it part-way


@dataclasses.dataclass(frozen=True)
class RetentionStatistics:
    keep: tuple[tuple[str, float | None], ...]  # (kind, seconds it is kept; None: forever)
    passes: int  # passes finished
    failures: int  # passes cut short by an error
    running: bool  # a pass is in progress
    last_pass_at: dt.datetime | None  # when the last finished pass began (the daemon's clock)
    last_pass_seconds: float | None
    pruned: tuple[tuple[str, int], ...]  # (kind, rows) deleted since start


class RetentionService:
    """Prunes what ``[retention]`` lets go; a daemon service."""

    name = "retention"

    def __init__(self, k: Kernel, *, pause: float = BATCH_PAUSE) -> None:
        self.k = k
        self.cfg = k.config.retention
        self._pruner = Pruner(k.store, self.cfg, pause=pause, count=self._count)
        self._pass = collections.Counter[str]()
        self._total = collections.Counter[str]()
        self._passes = 0
        self._failures = 0
        self._last_at: dt.datetime | None = None
        self._last_seconds: float | None = None
        self._idle = anyio.Event()
        self._idle.set()
        k.stats["retention"] = self.statistics
        m = k.metrics
        m.describe("segflow_retention_pruned_total", "counter",
                   "rows deleted by retention, by kind")
        m.describe("segflow_retention_passes_total", "counter", "retention passes finished")
        m.describe("segflow_retention_failures_total", "counter",
                   "retention passes cut short by an error")

    @property
    def enabled(self) -> bool:
        """False when every kind is kept forever: no pass ever runs."""
        c = self.cfg
        return any(a is not None for a in (c.finished_instances, c.messages,
                                           c.segment_changes, c.events, c.forget_window))

    # -- service ---------------------------------------------------------------------

    def register_routes(self, router: Router) -> None:
        return None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.enabled:
            log.info("retention.off", reason="every kind is kept forever")
            await anyio.sleep_forever()
        await self.k.clock.sleep(FIRST_PASS_DELAY)
        while not self._pruner.stopping:
            try:
                await self.prune_once()
            except Exception as exc:  # the next pass tries again; the daemon runs on
                self._failures += 1
                self.k.metrics.inc("segflow_retention_failures_total")
                if is_unavailable(exc) or isinstance(exc, StoreUnavailable):
                    log.warning("retention.store_unavailable", error=str(exc)[:300],
                                retry_in_s=self.cfg.interval)
                else:
                    log.error("retention.failed", error=str(exc)[:300], exc_info=True)
            await self.k.clock.sleep(self.cfg.interval)

    async def drain(self) -> None:
        """Let the batch in flight commit; start no other."""
        self._pruner.stopping = True
        await self._idle.wait()

    # -- a pass ----------------------------------------------------------------------

    async def prune_once(self) -> RetentionPass:
        """Run one pass now (the service's loop, and tests); what it deleted."""
        if not self._idle.is_set():
            raise RuntimeError("a retention pass is already running")
        self._idle = anyio.Event()
        began, t0 = self.k.clock.now(), time.monotonic()
        self._pass.clear()
        try:
            async with self.k.store.connect() as conn:
                guards = await load_guards(conn, self.k.app)
            await self._pruner.run(guards, began)
        finally:
            self._idle.set()
        seconds = time.monotonic() - t0
        n = self._pass
        done = RetentionPass(
            instances=n["instances"], journal_rows=n["journal_rows"], messages=n["messages"],
            engagement=n["engagement"], segment_changes=n["segment_changes"],
            events=n["events"], tombstones=n["tombstones"], seconds=seconds,
            complete=not self._pruner.stopping)
        self._passes += 1
        self._last_at, self._last_seconds = began, seconds
        self.k.metrics.inc("segflow_retention_passes_total")
        level = log.info if any(self._pass.values()) else log.debug
        level("retention.pruned", **{k: n[k] for k in KINDS}, seconds=round(seconds, 3),
              complete=done.complete)
        return done

    def _count(self, kind: str, rows: int) -> None:
        if rows:
            self._pass[kind] += rows
            self._total[kind] += rows
            self.k.metrics.inc("segflow_retention_pruned_total", rows, kind=kind)

    def statistics(self) -> RetentionStatistics:
        c = self.cfg
        return RetentionStatistics(
            keep=(("finished_instances", c.finished_instances), ("messages", c.messages),
                  ("segment_changes", c.segment_changes), ("events", c.events),
                  ("tombstones", c.forget_window)),
            passes=self._passes, failures=self._failures, running=not self._idle.is_set(),
            last_pass_at=self._last_at, last_pass_seconds=self._last_seconds,
            pruned=tuple((k, self._total[k]) for k in KINDS))
