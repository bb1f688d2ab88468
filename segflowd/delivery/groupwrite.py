"""Group writes: items submitted while a write runs are written together in the next one.

Each submitter waits for its own item's result. A store that cannot be reached fails
every item of the write (each submitter retries on its own); any other failure of a
write of several items has each written alone, so one value the store refuses fails
only its own item. A write, once begun, finishes even if its submitter is cancelled (it
is shielded), so the items it took from the others are never left without a result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio

from ..errors import StoreUnavailable

__all__ = ["GroupWrite"]

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[R]):
    def __init__(self) -> None:
        self.done = False
        self.value: R | None = None
        self.error: BaseException | None = None


class GroupWrite(Generic[T, R]):
    """``await submit(item)``: ``write_many(items)`` once for all items pending together."""

    def __init__(self, write_many: Callable[[Sequence[T]], Awaitable[Sequence[R]]]) -> None:
        self._write_many = write_many
        self._pending: list[tuple[T, _Slot[R]]] = []
        self._lock = anyio.Lock()
        self.writes = 0  # writes made (a figure for benchmarks and tests)

    async def submit(self, item: T) -> R:
        slot: _Slot[R] = _Slot()
        self._pending.append((item, slot))
        async with self._lock:
            if not slot.done:
                batch, self._pending = self._pending, []
                with anyio.CancelScope(shield=True):
                    await self._run(batch)
        if slot.error is not None:
            raise slot.error
        return slot.value  # type: ignore[return-value]  # reason: set with done, error None

    async def _run(self, batch: list[tuple[T, _Slot[R]]]) -> None:
        self.writes += 1
        try:
            results = await self._write_many([item for item, _ in batch])
        except StoreUnavailable as exc:
            for _, slot in batch:
                slot.done, slot.error = True, exc
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].done, batch[0][1].error = True, exc
                return
            for entry in batch:  # one bad item fails alone
                await self._run([entry])
            return
        for (_, slot), result in zip(batch, results, strict=True):
            slot.done, slot.value = True, result
