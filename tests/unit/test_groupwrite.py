"""GroupWrite: items submitted during a write share the next one; failures stay apart."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from segflowd.delivery.groupwrite import GroupWrite
from segflowd.errors import StoreUnavailable

pytestmark = pytest.mark.anyio


class Writer:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate = anyio.Event()
        self.finished: list[list[int]] = []

    async def write_many(self, items: Sequence[int]) -> list[int]:
        self.calls.append(list(items))
        if len(self.calls) == 1:
            await self.gate.wait()  # the first write is slow: the others pile up meanwhile
        if -1 in items:
            raise ValueError("the store refuses -1")
        if -2 in items:
            raise StoreUnavailable("down")
        self.finished.append(list(items))
        return [i * 10 for i in items]


async def test_items_submitted_during_a_write_share_the_next_one() -> None:
    w = Writer()
    group: GroupWrite[int, int] = GroupWrite(w.write_many)
    results: dict[int, int] = {}

    async def submit(i: int) -> None:
        results[i] = await group.submit(i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(submit, 0)
        await anyio.wait_all_tasks_blocked()
        for i in range(1, 6):
            tg.start_soon(submit, i)
        await anyio.wait_all_tasks_blocked()
        w.gate.set()
    assert results == {i: i * 10 for i in range(6)}
    assert w.calls == [[0], [1, 2, 3, 4, 5]]
    assert group.writes == 2


async def test_a_refused_item_fails_alone_and_an_outage_fails_all() -> None:
    w = Writer()
    w.gate.set()
    group: GroupWrite[int, int] = GroupWrite(w.write_many)
    outcomes: dict[int, object] = {}

    async def submit(i: int) -> None:
        try:
            outcomes[i] = await group.submit(i)
        except Exception as exc:
            outcomes[i] = type(exc).__name__

    group._pending.extend([])  # nothing pending before
    async with anyio.create_task_group() as tg:
        for i in (1, -1, 2):
            tg.start_soon(submit, i)
    assert outcomes == {1: 10, -1: "ValueError", 2: 20}
    async with anyio.create_task_group() as tg:
        for i in (3, -2):
            tg.start_soon(submit, i)
    assert outcomes[3] == "StoreUnavailable"
    assert outcomes[-2] == "StoreUnavailable"


async def test_a_cancelled_submitter_still_finishes_the_write_it_began() -> None:
    w = Writer()
    group: GroupWrite[int, int] = GroupWrite(w.write_many)
    got: list[int] = []
    first_scope = anyio.CancelScope()

    async def first() -> None:
        with first_scope:
            await group.submit(1)

    async def other() -> None:
        got.append(await group.submit(7))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await anyio.wait_all_tasks_blocked()  # 1 holds the lock; its write waits at the gate
            tg.start_soon(other)
            await anyio.wait_all_tasks_blocked()  # 7 waits behind it
            first_scope.cancel()  # the first submitter goes; its write (shielded) goes on
            await anyio.wait_all_tasks_blocked()
            assert w.calls == [[1]]
            w.gate.set()
    assert w.finished == [[1], [7]]  # the cancelled submitter's write was not cut short
    assert got == [70]
