"""Fakes for unit tests, shipped in the package (like ``httpx.MockTransport``).

Integration tests use the real components; these stand in for the I/O edges only.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools

import anyio
import anyio.lowlevel

__all__ = ["FakeClock"]

EPOCH = dt.datetime(2026, 1, 1, 12, 0, 0)  # a fixed, naive-UTC start for reproducible tests


class FakeClock:
    """A clock that moves only when told: ``await clock.advance(days=30)`` runs in ms.

    Sleepers wake in deadline order as :meth:`advance` passes their deadlines; each wake
    yields to the event loop so the woken task can run before time moves on.
    """

    def __init__(self, start: dt.datetime = EPOCH) -> None:
        self._now = start
        self._mono = 0.0
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._ids = itertools.count()

    def now(self) -> dt.datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        entry = (self._mono + seconds, next(self._ids), event)
        bisect.insort(self._sleepers, entry)
        try:
            await event.wait()
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    def set(self, now: dt.datetime) -> None:
        """Jump wall time without waking anyone (e.g. to seed data 'in the past')."""
        self._now = now

    async def advance(self, seconds: float = 0.0, *, days: float = 0, hours: float = 0,
                      minutes: float = 0, settle: int = 5) -> None:
        """Move time forward, waking every sleeper whose deadline passes, in order."""
        total = seconds + days * 86400 + hours * 3600 + minutes * 60
        target = self._mono + total
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, event = self._sleepers.pop(0)
            self._now += dt.timedelta(seconds=max(0.0, deadline - self._mono))
            self._mono = max(self._mono, deadline)
            event.set()
            for _ in range(settle):
                await anyio.lowlevel.checkpoint()
        self._now += dt.timedelta(seconds=target - self._mono)
        self._mono = target
        for _ in range(settle):
            await anyio.lowlevel.checkpoint()
