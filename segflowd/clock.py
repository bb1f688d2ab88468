"""The one injectable clock.

Everything that asks "what time is it" or "sleep until then" goes through a
:class:`Clock`, so a test can run a 30-day flow in milliseconds with
:class:`segflowd.testing.FakeClock`.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Protocol

import anyio

__all__ = ["Clock", "SystemClock", "utcnow"]


def utcnow() -> dt.datetime:
    """The current UTC time as a naive datetime (the store keeps naive UTC)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Clock(Protocol):
    """Wall time for the store, monotonic time for intervals, and sleeping."""

    def now(self) -> dt.datetime:
        """Naive UTC wall-clock time."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> dt.datetime:
        return utcnow()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))
