"""A hierarchical timer wheel: O(1) add and cancel, for the waits due soon.

Four levels of 256 slots at :data:`RESOLUTION` seconds per tick (level 0 spans 25.6 s,
level 1 about 1.8 h, level 2 about 19 days, level 3 about 13 years). A timer sits in
the lowest level whose span covers its distance; when a lower level wraps, the next
level's current slot is cascaded down. Advancing jumps over empty levels, so moving
time forward by a month with a handful of timers costs a handful of steps.

Only waits due within the flow service's horizon live here; later ones stay in the
store (``flow_instances.wake_at``, indexed) until the loader brings them in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable

__all__ = ["RESOLUTION", "TimerWheel", "WheelStatistics"]

RESOLUTION = 0.1  # seconds per tick
LEVELS = 4
BITS = 8  # 256 slots per level
SLOTS = 1 << BITS
MASK = SLOTS - 1
_MAX_DELTA = (1 << (BITS * LEVELS)) - 1  # ticks: farther timers are clamped and re-cascaded


@dataclasses.dataclass(frozen=True)
class WheelStatistics:
    size: int  # all waits: near + far
    near: int  # timers in memory (the near horizon)
    far: int  # waits in the store beyond the loaded horizon (counted at start, then kept)
    levels: tuple[int, ...]  # timers per wheel level
    fired: int
    lateness_p99: float  # seconds, over the recently fired timers


class TimerWheel:
    """Timers keyed by any hashable ``key`` (one timer per key; adding again replaces).

    Deadlines are seconds on any monotonic-enough scale (the flow service uses the
    epoch seconds of the injected clock). :meth:`advance` returns the keys that fell due,
    in deadline order within each tick, never before their deadline.
    """

    def __init__(self, now: float) -> None:
        self._tick = self._to_tick_floor(now)
        # slot dicts: key -> deadline (seconds); insertion order keeps the add order
        self._levels: list[list[dict[Hashable, float]]] = [
            [{} for _ in range(SLOTS)] for _ in range(LEVELS)]
        self._counts = [0] * LEVELS
        self._where: dict[Hashable, tuple[int, int]] = {}  # key -> (level, slot); -1: overdue
        self._overdue: dict[Hashable, float] = {}

    @staticmethod
    def _to_tick_floor(t: float) -> int:
        return math.floor(t / RESOLUTION)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._where

    @property
    def now(self) -> float:
        """The wheel's current time (the last tick advanced to), in seconds."""
        return self._tick * RESOLUTION

    def add(self, key: Hashable, deadline: float) -> None:
        """Schedule ``key`` at ``deadline`` (replacing any timer it had); O(1)."""
        if key in self._where:
            self.cancel(key)
        self._place(key, deadline)

    def _place(self, key: Hashable, deadline: float) -> None:
        expires = math.ceil(deadline / RESOLUTION - 1e-9)  # never fire before the deadline
        delta = expires - self._tick
        if delta <= 0:
            self._overdue[key] = deadline
            self._where[key] = (-1, 0)
            return
        if delta > _MAX_DELTA:
            expires = self._tick + _MAX_DELTA
            delta = _MAX_DELTA
        # the lowest level whose span covers delta; its slot index is ``expires``' bits
        # at that level, reached when the lower levels wrap, no later than ``expires``
        level = min((delta.bit_length() - 1) // BITS, LEVELS - 1)
        slot = (expires >> (BITS * level)) & MASK
        self._levels[level][slot][key] = deadline
        self._counts[level] += 1
        self._where[key] = (level, slot)

    def cancel(self, key: Hashable) -> bool:
        """Remove ``key``'s timer; True when it had one. O(1)."""
        where = self._where.pop(key, None)
        if where is None:
            return False
        level, slot = where
        if level < 0:
            del self._overdue[key]
        else:
            del self._levels[level][slot][key]
            self._counts[level] -= 1
        return True

    def deadline(self, key: Hashable) -> float | None:
        where = self._where.get(key)
        if where is None:
            return None
        level, slot = where
        return self._overdue[key] if level < 0 else self._levels[level][slot][key]

    def next_due(self) -> float | None:
        """A lower bound of the earliest deadline (exact for level 0), or None when empty.

        Sleeping until it and advancing is always safe: at worst the wheel cascades and
        the caller asks again.
        """
        if not self._where:
            return None
        if self._overdue:
            return self.now
        for level in range(LEVELS):
            if not self._counts[level]:
                continue
            shift = BITS * level
            base = self._tick >> shift
            for i in range(1, SLOTS + 1):
                slot = self._levels[level][(base + i) & MASK]
                if slot:
                    if level == 0:
                        return min(slot.values())
                    # the slot cascades when the lower levels wrap to it
                    return ((base + i) << shift) * RESOLUTION
        return self.now  # pragma: no cover - counts say something is somewhere

    def next_fire(self) -> float | None:
        """When :meth:`advance` can next return a timer (or must cascade): :meth:`next_due`
        rounded up to the tick it fires on. A timer due 12.34 fires at tick 12.4, so a
        caller that slept only until 12.34 would find nothing and ask again until then."""
        due = self.next_due()
        if due is None:
            return None
        return max(due, math.ceil(due / RESOLUTION - 1e-9) * RESOLUTION)

    def advance(self, now: float) -> list[tuple[Hashable, float]]:
        """Move to ``now``; return ``(key, deadline)`` of the timers that passed, oldest
        first within each tick (overdue ones first of all)."""
        due: list[tuple[Hashable, float]] = []
        if self._overdue:
            for key in self._overdue:
                del self._where[key]
            due.extend(sorted(self._overdue.items(), key=lambda kv: kv[1]))
            self._overdue = {}
        target = self._to_tick_floor(now)
        while self._tick < target:
            if not self._where:
                self._tick = target
                break
            # Jump over levels with nothing in them: with levels below L empty, nothing
            # can happen before the next boundary of level L-1's rotation.
            lowest = next(lv for lv in range(LEVELS) if self._counts[lv])
            # level L's slots are reached at multiples of SLOTS**L ticks
            step = 1 << (BITS * lowest)
            nxt = (self._tick // step + 1) * step
            if nxt > target:
                self._tick = target
                break
            self._tick = nxt
            self._cascade()
            if self._overdue:  # cascaded timers due exactly now
                for key in self._overdue:
                    del self._where[key]
                due.extend(self._overdue.items())
                self._overdue = {}
            slot = self._levels[0][self._tick & MASK]
            if slot:
                fired = sorted(slot.items(), key=lambda kv: kv[1])
                self._counts[0] -= len(slot)
                self._levels[0][self._tick & MASK] = {}
                for key, _ in fired:
                    del self._where[key]
                due.extend(fired)
        return due

    def _cascade(self) -> None:
        tick = self._tick
        for level in range(1, LEVELS):
            if (tick >> (BITS * (level - 1))) & MASK:
                return  # the level below did not wrap
            index = (tick >> (BITS * level)) & MASK
            slot = self._levels[level][index]
            if not slot:
                continue
            self._levels[level][index] = {}
            self._counts[level] -= len(slot)
            for key, deadline in slot.items():
                del self._where[key]
                self._place(key, deadline)

    def counts(self) -> tuple[int, ...]:
        """Timers per level (overdue ones not included)."""
        return tuple(self._counts)
