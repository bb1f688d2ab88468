"""Handing claimed messages over, attacked: a crash or a drain after some one-message calls
were answered, a mark whose COMMIT reply is lost on a message's last attempt, and a
release that finds its rows settled by someone else. On both stores."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from delivery_harness import Setup, make_kernel, message_row, service
from sqlalchemy.exc import OperationalError
from test_delivery_handover import (
    BATCH,
    RecordingProvider,
    queue_many,
    status_counts,
)

from segflowd.providers import OutgoingMessage, SendResult
from segflowd.schema import messages
from segflowd.store import Store

pytestmark = pytest.mark.anyio


@pytest.fixture
def setup(store: Store, tmp_path: Path) -> Setup:
    return make_kernel(store, tmp_path)


class AnswersThenHangs:
    """One message per call: answers the first ``answered`` calls (sent), then hangs."""

    parallel_calls = 1
    max_batch = BATCH

    def __init__(self, answered: int) -> None:
        self.answered = answered
        self.calls: list[int] = []
        self.hanging = anyio.Event()

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls.extend(m.id for m in batch)
        if len(self.calls) > self.answered:
            self.hanging.set()
            await anyio.sleep_forever()
        return [SendResult(ok=True, provider_message_id=f"p-{m.id}") for m in batch]

    async def aclose(self) -> None:
        return None


async def test_a_crash_after_answered_calls_leaves_only_the_call_in_flight_unknown(
        setup: Setup) -> None:
    """A kill -9 while the fourth one-message call hangs: the three the provider answered
    are ``sent`` already (not ``unknown``, where ``retry-unknown`` would send them twice)."""
    await queue_many(setup, BATCH)
    provider = AnswersThenHangs(answered=3)
    crashed = service(setup, provider)
    async with anyio.create_task_group() as tg:
        tg.start_soon(crashed.run_once)
        with anyio.fail_after(10):
            await provider.hanging.wait()
        killed = await status_counts(setup)  # what a kill -9 right now leaves
        tg.cancel_scope.cancel()
    assert killed == {"sent": 3, "sending": 1, "claimed": BATCH - 4}


async def test_a_drain_after_answered_calls_records_them_sent(setup: Setup) -> None:
    """A drain cut short while the fourth call hangs: three ``sent``, one ``unknown``, the
    rest queued again, and the counts say so."""
    await queue_many(setup, BATCH)
    provider = AnswersThenHangs(answered=3)
    svc = service(setup, provider)
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.run_once)
        with anyio.fail_after(10):
            await provider.hanging.wait()
        tg.cancel_scope.cancel()  # [daemon] drain_timeout
    assert await status_counts(setup) == {"sent": 3, "unknown": 1, "queued": BATCH - 4}
    metrics = setup.kernel.metrics
    assert metrics.value("segflow_messages_total", status="sent") == 3
    assert metrics.value("segflow_messages_total", status="unknown") == 1
    assert svc.statistics().sent == 3
    assert svc.statistics().unknown == 1


@pytest.mark.parametrize("parallel_calls", [None, 1])
async def test_a_mark_whose_commit_reply_is_lost_on_the_last_attempt_is_not_failed(
        setup: Setup, monkeypatch: pytest.MonkeyPatch, parallel_calls: int | None) -> None:
    """The mark's UPDATE to ``sending`` committed but the worker heard 'lost connection':
    nothing was handed over, so the message is queued again with its attempt given back,
    never failed (here its claim was its last attempt) nor counted a retry."""
    [mid] = await queue_many(setup, 1)
    store = setup.kernel.store
    async with store.begin() as conn:
        await conn.execute(sa.update(messages).values(attempts=2))  # max_attempts = 3
    provider = RecordingProvider(parallel_calls)
    svc = service(setup, provider)
    real_begin = store.begin
    calls = [0]

    @contextlib.asynccontextmanager
    async def begin() -> Any:
        calls[0] += 1
        async with real_begin() as conn:
            yield conn
        if calls[0] == 2:  # the claim, then the mark: committed, reported lost
            raise OperationalError("COMMIT", {}, Exception(
                "(2013, 'Lost connection to server during query')"))

    monkeypatch.setattr(store, "begin", begin)
    assert await svc.run_once() == 1
    assert provider.calls == []
    row = await message_row(store, mid)
    assert (row["status"], row["attempts"]) == ("queued", 2)
    assert setup.kernel.metrics.value("segflow_messages_total", status="failed") == 0
    assert setup.kernel.metrics.value("segflow_messages_total", status="retrying") == 0
    await setup.clock.advance(3600)
    assert await svc.run_once() == 1
    assert provider.calls == [[mid]]
    row = await message_row(store, mid)
    assert (row["status"], row["attempts"]) == ("sent", 3)


async def test_a_release_counts_unknown_only_the_rows_it_settled(setup: Setup) -> None:
    """A worker cancelled after a restart's recovery made its handed rows ``unknown``
    finds nothing of its own: it does not count (or publish) them ``unknown`` again."""
    await queue_many(setup, 2)
    provider = AnswersThenHangs(answered=1)
    crashed = service(setup, provider)
    async with anyio.create_task_group() as tg:
        tg.start_soon(crashed.run_once)
        with anyio.fail_after(10):
            await provider.hanging.wait()
        assert len(await service(setup, RecordingProvider()).recover()) == 1
        tg.cancel_scope.cancel()
    assert await status_counts(setup) == {"sent": 1, "unknown": 1}
    assert setup.kernel.metrics.value("segflow_messages_total", status="unknown") == 1
    assert crashed.statistics().unknown == 0  # the restart counted it, not the old worker


class DownThenHangs(AnswersThenHangs):
    """Answers the first ``answered`` calls with an outage, then hangs."""

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        await super().send(batch)
        return [SendResult(ok=False, outage=True, error="503 down") for _ in batch]


async def test_a_drain_after_an_outage_answer_queues_that_message_again(
        setup: Setup) -> None:
    """The provider said it is down (nothing went out) for the first call, the second
    hangs when the drain is cut short: the first is queued again, only the second is
    ``unknown``."""
    first, second, *_ = await queue_many(setup, 3)
    provider = DownThenHangs(answered=1)
    svc = service(setup, provider)
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.run_once)
        with anyio.fail_after(10):
            await provider.hanging.wait()
        tg.cancel_scope.cancel()
    assert provider.calls[:2] == [first, second]
    assert await status_counts(setup) == {"queued": 2, "unknown": 1}
    row = await message_row(setup.kernel.store, first)
    assert (row["status"], row["attempts"]) == ("queued", 0)
