"""The narrow interfaces between the daemon's parts, as the picture in DESIGN.md draws them.

    ingest ──IngestBatch──► segments, transactions, flows (wait_for_event)
    segments ──MembershipChange──► flows
    flows, transactions ──messages rows (outbox)──► delivery (woken by OutboxWaker)

The in-memory hand-off is the fast path only. The store is the log: every consumer of
ingest keeps a durable cursor (last event id / user ``updated_at`` it has processed)
and catches up from the store at start, so an event committed just before a crash
still reaches every engine after the restart.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

__all__ = [
    "INGEST_TABLES",
    "ChangeCursorSink",
    "ConditionRunner",
    "ContextProvider",
    "IngestBatch",
    "IngestSink",
    "MembershipChange",
    "MembershipSink",
    "OutboxWaker",
    "StoredEvent",
]


@dataclasses.dataclass(frozen=True)
class StoredEvent:
    """An event as committed to the store (``id`` is its row id)."""

    id: int
    user_id: str | None
    anonymous_id: str | None
    name: str
    attributes: Mapping[str, object]
    created_at: dt.datetime  # the event's time: the client's timestamp, or received_at
    received_at: dt.datetime


# The tables an ingest commit writes; a batch from elsewhere (an audience sync) names its own.
INGEST_TABLES = frozenset({"users", "events", "anonymous_links"})


@dataclasses.dataclass(frozen=True)
class IngestBatch:
    """What one group commit (or one audience sync) made durable."""

    users: frozenset[str]  # users created, updated, or given events (or joined from anonymous)
    # new events in commit order, and any event a client sent again whose first try was
    # already stored (its reply may have been lost): consumers dedupe by id
    events: tuple[StoredEvent, ...]
    deleted: frozenset[str] = frozenset()  # users forgotten
    # each forgotten user -> the segments they were a member of when the forget deleted
    # their memberships (the segment engine reports those exits)
    left: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    tables: frozenset[str] = INGEST_TABLES  # the store tables the batch wrote
    # message rows of the forgotten users: delivery has a provider that keeps copies of
    # what it sent (the outbox's files) delete theirs
    forgotten_messages: tuple[int, ...] = ()


class IngestSink(Protocol):
    """Told after each group commit. Must return quickly: queue the work, do not do it."""

    def ingested(self, batch: IngestBatch) -> None: ...


@dataclasses.dataclass(frozen=True)
class MembershipChange:
    """A user entered (``entered=True``) or left a segment at ``at``."""

    segment: str
    user_id: str
    entered: bool
    at: dt.datetime
    event_id: int | None = None  # the event whose ingest caused it, where one did
    # an exit because the user was forgotten: their memberships, history and instances
    # are already gone, so a sink has nothing of theirs to act on
    forgotten: bool = False


class MembershipSink(Protocol):
    """Told of membership changes after they are committed, in the order they happened."""

    async def membership_changed(self, changes: Sequence[MembershipChange]) -> None: ...


@runtime_checkable
class ChangeCursorSink(Protocol):
    """A membership sink that keeps a durable cursor over ``segment_changes.id``: told,
    after hand-offs, that every change with an id up to ``change_id`` has been handed to
    it (a change still being written, by any writer, has a higher id)."""

    def changes_through(self, change_id: int) -> None: ...


class OutboxWaker(Protocol):
    """Told that queued messages were committed, so delivery need not wait for its poll."""

    def wake(self) -> None: ...


class ConditionRunner(Protocol):
    """Runs a DirectFlow condition: ``sql`` on the named source, the bool of ``result``."""

    async def condition(self, source: str, sql: str, params: Mapping[str, object]) -> bool: ...


class ContextProvider(Protocol):
    """Adds template context for a message at send time (DirectFlow preload: ``profile``)."""

    async def context_for(self, user_id: str,
                          data: Mapping[str, object]) -> Mapping[str, object]: ...
