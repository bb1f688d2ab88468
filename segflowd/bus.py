"""The live event bus: the daemon publishes what happens; subscribers read it.

Publishing never blocks and never fails: each subscriber has a bounded buffer, and an
event that does not fit is dropped *for that subscriber only* and counted, so a slow or
stuck client (the TUI over the control socket) can never slow the daemon. The next event
a lagging subscriber receives tells it how many it missed.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import itertools
from collections.abc import Iterable, Mapping

import anyio

from .clock import utcnow

__all__ = ["Bus", "BusEvent", "BusStatistics", "Subscription"]

SUBSCRIBER_BUFFER = 10_000  # events held per subscriber before it starts missing some
RECENT = 500  # events kept for a new subscriber's backlog and for snapshots


@dataclasses.dataclass(frozen=True)
class BusEvent:
    """One thing that happened. ``kind`` is a stable dotted name (``segment.entered``)."""

    seq: int
    kind: str
    at: dt.datetime
    data: Mapping[str, object]

    def as_json(self) -> dict[str, object]:
        return {"seq": self.seq, "kind": self.kind, "at": self.at.isoformat() + "Z",
                **self.data}


@dataclasses.dataclass(frozen=True)
class BusStatistics:
    published: int
    subscribers: int
    dropped: int


class Subscription:
    """A subscriber's bounded buffer. Iterate with ``async for``; close when done."""

    def __init__(self, bus: Bus, buffer: int, kinds: frozenset[str] | None) -> None:
        self._bus = bus
        self._queue: collections.deque[BusEvent] = collections.deque()
        self._buffer = buffer
        self._kinds = kinds
        self._ready = anyio.Event()
        self.missed = 0  # dropped since the last receive() reported them
        self.missed_total = 0
        self.closed = False

    def _offer(self, event: BusEvent) -> None:
        if self._kinds is not None and not _matches(event.kind, self._kinds):
            return
        if len(self._queue) >= self._buffer:
            self.missed += 1
            self.missed_total += 1
            self._bus._dropped += 1
            return
        self._queue.append(event)
        self._ready.set()

    def pending(self) -> int:
        return len(self._queue)

    async def receive(self) -> tuple[BusEvent, int]:
        """The next event and how many were missed just before it."""
        while not self._queue:
            if self.closed:
                raise anyio.EndOfStream
            self._ready = anyio.Event()
            await self._ready.wait()
        missed, self.missed = self.missed, 0
        return self._queue.popleft(), missed

    def drain(self, limit: int = 1000) -> tuple[list[BusEvent], int]:
        """Everything buffered now (up to ``limit``) without waiting, and the missed count."""
        out = [self._queue.popleft() for _ in range(min(limit, len(self._queue)))]
        missed, self.missed = self.missed, 0
        return out, missed

    def close(self) -> None:
        self.closed = True
        self._bus._subscribers.discard(self)
        self._ready.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> BusEvent:
        try:
            event, _ = await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        return event


def _matches(kind: str, kinds: frozenset[str]) -> bool:
    # "flow" matches "flow.step", "flow.failed", ...; an exact kind matches itself.
    return kind in kinds or kind.split(".", 1)[0] in kinds


class Bus:
    """Publish/subscribe inside the daemon. Not thread-safe: use from the event loop."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self._seq = itertools.count(1)
        self._published = 0
        self._dropped = 0
        self.recent: collections.deque[BusEvent] = collections.deque(maxlen=RECENT)

    def publish(self, kind: str, **data: object) -> BusEvent:
        return self._emit(kind, utcnow(), data, tuple(self._subscribers))

    def publish_each(self, kind: str, items: Iterable[Mapping[str, object]]) -> None:
        """``publish(kind, **data)`` for each mapping in ``items``, all at one time.

        For a batch (an ingest commit's events): one clock reading and one look at the
        subscribers for all of them.
        """
        at = utcnow()
        subscribers = tuple(self._subscribers)
        for data in items:
            self._emit(kind, at, data, subscribers)

    def _emit(self, kind: str, at: dt.datetime, data: Mapping[str, object],
              subscribers: tuple[Subscription, ...]) -> BusEvent:
        event = BusEvent(next(self._seq), kind, at, data)
        self._published += 1
        self.recent.append(event)
        for sub in subscribers:
            sub._offer(event)
        return event

    def subscribe(self, *, buffer: int = SUBSCRIBER_BUFFER,
                  kinds: frozenset[str] | None = None) -> Subscription:
        """A new subscription to events published from now on (optionally some kinds)."""
        sub = Subscription(self, buffer, kinds)
        self._subscribers.add(sub)
        return sub

    def statistics(self) -> BusStatistics:
        return BusStatistics(self._published, len(self._subscribers), self._dropped)
