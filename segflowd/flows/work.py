"""What the flow service and its stepper share: tunables, a unit of due work, statistics,
and the narrow interface (:class:`StepHost`) the stepper drives the service through, so
:mod:`.steps` never imports :mod:`.service`."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Protocol

from ..hooks import ConditionRunner, OutboxWaker
from ..kernel import Kernel

__all__ = ["ACTIVE", "CLOCK_STEP_TOLERANCE", "EPOCH", "MAX_COMMANDS_WITHOUT_WAIT",
           "FlowStatistics", "StepHost", "Work", "WorkKind", "secs"]

HORIZON = 300.0  # seconds: waits due sooner than this live in the in-memory wheel
MAX_COMMANDS_WITHOUT_WAIT = 1000  # commands a flow may yield in a row before it is a runaway
BATCH = 200  # due instances a worker loads and steps before yielding to other tasks
WORKERS = 8  # concurrent step workers (each holds at most one store connection)
LOAD_CHUNK = 5000  # waits the loader moves into the wheel per query
MEMBERSHIP_CHUNK = 500  # users whose memberships are read per query on entries and exits
LOAD_RETRY = 5.0  # seconds before the loader tries a store that failed again
RESYNC_RETRY = 1.0  # seconds between attempts to pick up work an outage dropped
CATCH_UP_CHANGES = 10_000  # changes replayed per query at start (with no cursor: the newest)
STATS_REFRESH = 30.0  # seconds between recounts of instances per campaign and state
LATENESS_WINDOW = 10_000  # fired timers kept for the lateness percentile
CLOCK_STEP_TOLERANCE = 1.0  # seconds the wall clock may be behind the wheel before a rebuild

EPOCH = dt.datetime(1970, 1, 1)  # the wheel counts seconds from here (naive UTC)
ACTIVE = ("running", "waiting")  # the statuses of an instance that can still step

WorkKind = Literal["run", "timer", "event"]


def secs(t: dt.datetime) -> float:
    """``t`` as the wheel's seconds."""
    return (t - EPOCH).total_seconds()


@dataclasses.dataclass(frozen=True)
class Work:
    instance: int
    kind: WorkKind
    event: Mapping[str, object] | None = None  # for "event": the event as JSON
    event_name: str | None = None
    # for "event": the instance's seq when it was found waiting; the event wakes that
    # wait only, so a wake delivered again (after an outage) never wakes a later one
    seq: int | None = None


@dataclasses.dataclass(frozen=True)
class FlowStatistics:
    instances: tuple[tuple[str, str, int], ...]  # (campaign, status, count), at the last recount
    steps: int
    steps_per_second: float  # over the last minute
    failures: int
    diverged: int
    paused: tuple[str, ...]
    queued: int  # due work waiting for a worker
    # paused campaigns (on_pause="hold") -> users who would enter on resume, as last counted
    waiting_entries: Mapping[str, int] = dataclasses.field(default_factory=dict)


class StepHost(Protocol):
    """What :class:`~segflowd.flows.steps.Stepper` needs of the service it steps for."""

    k: Kernel
    wakers: Sequence[OutboxWaker]
    conditions: ConditionRunner | None
    paused: set[str]
    awaited: set[str]  # event names a wait_for_event has waited on

    def cancel_timer(self, instance: int) -> None: ...

    def count_steps(self, n: int) -> None: ...

    def hold_wakes(self, from_event: int) -> None: ...

    def start_run(self, instance: int) -> None: ...

    def hold_paused_wake(self, campaign: str, work: Work) -> None: ...

    def waits_began(self, instances: Iterable[int], from_event: int) -> None: ...

    def schedule(self, instance: int, wake_at: dt.datetime) -> None: ...

    def ended(self, iid: int, campaign: str, user_id: str, status: str,
              error: str | None) -> None: ...
