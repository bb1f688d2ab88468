"""Handing claimed messages to the provider: a row is ``claimed`` until a commit right
before the call that hands it over makes it ``sending``, so a crash (a process that stops
with no chance to record anything) leaves ``unknown`` only what a provider may have had:
one call's messages per worker, not the claimed batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from delivery_harness import Setup, add_user, make_kernel, service

from segflowd.delivery.outbox import enqueue
from segflowd.delivery.prepare import Prepared
from segflowd.ingest.users import forget
from segflowd.providers import OutgoingMessage, SendResult
from segflowd.schema import messages
from segflowd.store import Store

pytestmark = pytest.mark.anyio

BATCH = 10


@pytest.fixture
def setup(store: Store, tmp_path: Path) -> Setup:
    return make_kernel(store, tmp_path)


class HangingProvider:
    """Takes messages and never answers: every call hangs until cancelled."""

    def __init__(self, parallel_calls: int | None) -> None:
        self.max_batch = BATCH
        if parallel_calls is not None:
            self.parallel_calls = parallel_calls
        self.calls: list[list[int]] = []
        self.in_flight = 0

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls.append([m.id for m in batch])
        self.in_flight += len(batch)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        return None


class RecordingProvider:
    def __init__(self, parallel_calls: int | None = None) -> None:
        self.max_batch = BATCH
        if parallel_calls is not None:
            self.parallel_calls = parallel_calls
        self.calls: list[list[int]] = []

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls.append([m.id for m in batch])
        return [SendResult(ok=True, provider_message_id=f"p-{m.id}") for m in batch]

    async def aclose(self) -> None:
        return None


async def queue_many(setup: Setup, n: int) -> list[int]:
    ids = []
    for i in range(n):
        await add_user(setup.kernel.store, f"u{i}", f"user{i}@example.org", name=f"U{i}")
        async with setup.kernel.store.begin() as conn:
            mid = await enqueue(conn, kind="campaign", template="welcome",
                                now=setup.clock.now(), user_id=f"u{i}", dedupe_key=None,
                                data={"plan": "pro"}, campaign="onboarding")
        assert mid is not None
        ids.append(mid)
    return ids


async def status_counts(setup: Setup) -> dict[str, int]:
    async with setup.kernel.store.connect() as conn:
        rows = (await conn.execute(sa.select(messages.c.status, sa.func.count())
                                   .group_by(messages.c.status))).all()
    return {str(s): int(n) for s, n in rows}


async def crash_while_hanging(setup: Setup, provider: HangingProvider,
                              in_flight: int) -> dict[str, int]:
    """Run a batch until ``in_flight`` messages hang in the provider, read the rows as a
    process killed right then would leave them, restart delivery on the store, and
    return the statuses after its recovery."""
    crashed = service(setup, provider)
    async with anyio.create_task_group() as tg:
        tg.start_soon(crashed.run_once)
        with anyio.fail_after(10):
            while provider.in_flight < in_flight:  # noqa: ASYNC110 - a count, no event
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)  # nothing more is handed over while those hang
        assert provider.in_flight == in_flight
        killed = await status_counts(setup)
        # A kill -9 records nothing: a new process recovers from the rows as they are.
        restarted = service(setup, RecordingProvider())
        unknown = await restarted.recover()
        assert len(unknown) == killed.get("sending", 0)
        tg.cancel_scope.cancel()  # the old worker goes (its release finds nothing of its own)
    return killed


async def test_a_crash_mid_batch_leaves_only_the_calls_in_flight_unknown(
        setup: Setup) -> None:
    ids = await queue_many(setup, BATCH)
    provider = HangingProvider(parallel_calls=2)
    killed = await crash_while_hanging(setup, provider, in_flight=2)
    assert killed == {"sending": 2, "claimed": BATCH - 2}
    assert all(len(call) == 1 for call in provider.calls)  # one message per call
    after = await status_counts(setup)
    assert after == {"unknown": 2, "queued": BATCH - 2}
    # The restart sends the rest, each once, and never the two the provider may have.
    again = RecordingProvider(parallel_calls=2)
    svc = service(setup, again)
    assert await svc.run_once() == BATCH - 2
    hung = {i for call in provider.calls for i in call}
    assert sorted(i for call in again.calls for i in call) == sorted(set(ids) - hung)
    assert await status_counts(setup) == {"unknown": 2, "sent": BATCH - 2}


async def test_a_batching_provider_is_marked_sending_only_for_its_call(
        setup: Setup) -> None:
    await queue_many(setup, BATCH)
    provider = HangingProvider(parallel_calls=None)  # one call for the batch
    killed = await crash_while_hanging(setup, provider, in_flight=BATCH)
    assert killed == {"sending": BATCH}
    assert len(provider.calls) == 1
    assert await status_counts(setup) == {"unknown": BATCH}


async def test_a_crash_while_rendering_loses_nothing(setup: Setup) -> None:
    """Before any call, the whole batch is only claimed: a restart sends all of it."""
    ids = await queue_many(setup, BATCH)
    crashed = service(setup, RecordingProvider())
    rendering = anyio.Event()

    async def hang(rows: Sequence[Mapping[str, Any]]) -> list[Prepared]:
        rendering.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    crashed._preparer.prepare = hang  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        tg.start_soon(crashed.run_once)
        with anyio.fail_after(10):
            await rendering.wait()
        assert await status_counts(setup) == {"claimed": BATCH}
        provider = RecordingProvider()
        restarted = service(setup, provider)
        assert await restarted.recover() == []
        tg.cancel_scope.cancel()
    assert await status_counts(setup) == {"queued": BATCH}
    assert await restarted.run_once() == BATCH
    assert sorted(i for call in provider.calls for i in call) == sorted(ids)
    async with setup.kernel.store.connect() as conn:
        attempts = {int(a) for (a,) in await conn.execute(sa.select(messages.c.attempts))}
    assert attempts == {1}  # the crashed claim's attempt was given back


@pytest.mark.parametrize("parallel_calls", [None, 1])
async def test_a_message_forgotten_while_claimed_is_not_sent(
        setup: Setup, parallel_calls: int | None) -> None:
    ids = await queue_many(setup, 3)
    provider = RecordingProvider(parallel_calls)
    svc = service(setup, provider)
    prepare = svc._preparer.prepare

    async def forget_midway(rows: Sequence[Mapping[str, Any]]) -> list[Prepared]:
        prepared = await prepare(rows)  # rendered with u1's address in hand ...
        async with setup.kernel.store.begin() as conn:  # ... when u1 is forgotten
            await forget(conn, "u1", setup.clock.now())
        return prepared

    svc._preparer.prepare = forget_midway  # type: ignore[method-assign]
    assert await svc.run_once() == 3
    sent = sorted(i for call in provider.calls for i in call)
    assert sent == [ids[0], ids[2]]
    async with setup.kernel.store.connect() as conn:
        rows = {int(r.id): r for r in await conn.execute(sa.select(
            messages.c.id, messages.c.status, messages.c.user_id, messages.c.to_address))}
    assert rows[ids[1]].status == "failed"
    assert (rows[ids[1]].user_id, rows[ids[1]].to_address) == (None, None)
    assert (rows[ids[0]].status, rows[ids[2]].status) == ("sent", "sent")
