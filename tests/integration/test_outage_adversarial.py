"""The provider-outage circuit and the lanes under an adversary's scenarios.

Each test failed on the first version of the outage handling: a record retried after a
lost COMMIT reply undid a later claim (a message sent twice; now every claim has a
token), an outage answer among accepted ones was re-sent without pause (now it is a
transient failure with backoff), several workers probed at once, a provider that never
answers turned the whole queue ``unknown``, and a probe without an answer closed the
circuit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from delivery_harness import ScriptedProvider, Setup, add_user, make_kernel

from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.errors import StoreUnavailable
from segflowd.providers import OutgoingMessage, SendResult
from segflowd.schema import messages
from segflowd.store import Store

pytestmark = pytest.mark.anyio

DOWN = SendResult(ok=False, error="ses HTTP 404 NotFoundException: configuration set",
                  transient=False, outage=True)


@pytest.fixture
def setup(store: Store, tmp_path: Path) -> Setup:
    return make_kernel(store, tmp_path)  # max_attempts = 3


async def queue(setup: Setup, n: int, kind: str = "transaction") -> list[int]:
    ids = []
    async with setup.kernel.store.begin() as conn:
        for _ in range(n):
            mid = await enqueue(conn, kind=kind, template="welcome",  # type: ignore[arg-type]
                                now=setup.clock.now(), user_id="u1", dedupe_key=None,
                                to_address=None, data={"plan": "pro"},
                                campaign="news" if kind == "campaign" else None)
            assert mid is not None
            ids.append(mid)
    return ids


async def row(store: Store, mid: int) -> sa.RowMapping:
    async with store.connect() as conn:
        return (await conn.execute(sa.select(messages).where(messages.c.id == mid))
                ).mappings().one()


# -- 1. a record retried after a lost COMMIT reply lands on a newer claim ---------------

class TwoWorkersProvider:
    """Call 1 (worker A): the first message sent, the second meets an outage.
    Call 2 (worker B): blocks until released, then sent. Later calls: sent."""

    max_batch = 100

    def __init__(self) -> None:
        self.calls = 0
        self.handed: list[int] = []
        self.ok: list[int] = []
        self.b_inside = anyio.Event()
        self.b_release = anyio.Event()
        self.arm_record_loss = False

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls += 1
        call = self.calls
        self.handed += [m.id for m in batch]
        if call == 1:
            assert len(batch) == 2
            self.arm_record_loss = True  # worker A's record: committed, reply lost
            self.ok.append(batch[0].id)
            return [SendResult(ok=True, provider_message_id="a"),
                    SendResult(ok=False, error="smtp 550 5.1.1 at RCPT TO: no such user")]
        if call == 2:
            self.b_inside.set()
            await self.b_release.wait()
        self.ok += [m.id for m in batch]
        return [SendResult(ok=True, provider_message_id=f"p{call}") for _ in batch]

    async def aclose(self) -> None:
        return None


async def test_a_record_retried_after_a_lost_commit_reply_does_not_undo_a_newer_claim(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker A's batch: m1 sent, m2 refused. A's record commits but A hears 'lost
    connection' (StoreUnavailable) and retries it every second. Meanwhile the operator
    retries m2 (``message.retry``: queued, due now) and worker B claims it and hands it
    to the provider. A's retry must not match B's claim (``status = 'sending'`` alone
    would): each claim has its token, and an outcome is recorded only under its own."""
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    _m1, m2 = await queue(setup, 2)
    provider = TwoWorkersProvider()
    svc = DeliveryService(setup.kernel, providers={"scripted": provider})
    store = setup.kernel.store
    real_begin = store.begin
    a_lost = anyio.Event()

    @contextlib.asynccontextmanager
    async def begin() -> Any:
        async with real_begin() as conn:
            yield conn
        if provider.arm_record_loss:  # committed; the worker hears otherwise
            provider.arm_record_loss = False
            a_lost.set()
            raise StoreUnavailable("store unavailable: (2013, 'Lost connection to server "
                                   "during query')")

    monkeypatch.setattr(store, "begin", begin)
    claimed: dict[str, int] = {}

    async def worker(name: str) -> None:
        claimed[name] = await svc.run_once(svc.lanes[0])

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, "A")
            await a_lost.wait()  # A's outcomes are in the store; A sleeps, then retries
            assert (await row(store, m2))["status"] == "failed"
            await setup.kernel.actions["message.retry"]({"message": m2})
            tg.start_soon(worker, "B")
            await provider.b_inside.wait()  # B has m2 at the provider
            await setup.clock.advance(1.0)  # A retries its record
            for _ in range(50):
                await anyio.sleep(0.01)
                if "A" in claimed:
                    break
            provider.b_release.set()
    await svc.run_once()  # whatever is still queued
    await setup.clock.advance(120.0)
    await svc.run_once()
    assert (await row(store, m2))["status"] == "sent"  # B's outcome, not A's
    assert provider.ok.count(m2) == 1, (
        f"m2 was accepted by the provider {provider.ok.count(m2)} times "
        f"(handed {provider.handed.count(m2)} times); row now {dict(await row(store, m2))}")


# -- 2. a per-message outage in a mixed batch: re-sent without pause, forever ------------

class CampaignConfigSetMissing(ScriptedProvider):
    """SES with a mistyped ``configuration_set_marketing``: every campaign message is
    refused with NotFoundException (classified an outage), transactional mail goes out."""

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls += 1
        self.sent += batch
        return [DOWN if m.kind == "campaign" else SendResult(ok=True, provider_message_id="x")
                for m in batch]


async def test_an_outage_answer_in_a_batch_the_provider_otherwise_took_is_not_resent_hot(
        setup: Setup) -> None:
    """The circuit opens only when *every* result is an outage. A message refused as an
    outage beside messages the provider accepted is held with ``next_attempt_at = now``
    and its attempt given back, the circuit stays shut: the next batch (the worker loops
    at once when it claimed something) hands it over again, and again — no probe delay,
    no backoff, no max_attempts, no alarm."""
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    [campaign] = await queue(setup, 1, kind="campaign")
    provider = CampaignConfigSetMissing()
    svc = DeliveryService(setup.kernel, providers={"scripted": provider})
    for _ in range(10):  # a steady trickle of transactional mail, 0.1 s apart
        await queue(setup, 1)
        assert await svc.run_once() in (1, 2)  # the refused one waits its backoff
        await setup.clock.advance(0.1)
    handed = [m.id for m in provider.sent].count(campaign)
    r = await row(setup.kernel.store, campaign)
    assert r["attempts"] >= 1  # a per-message refusal spends its attempt
    assert handed <= 3, (
        f"within 1 s the refused campaign message was handed to the provider {handed} "
        f"times; row: status={r['status']} attempts={r['attempts']}; circuit open="
        f"{svc.lanes[0].circuit.open}")


# -- 3. several workers of one lane all probe at once ------------------------------------

async def test_a_half_open_circuit_lets_one_probe_through_whatever_the_concurrency(
        setup: Setup) -> None:
    """With ``concurrency`` > 1 every worker sees ``wait() == 0`` when the probe is due
    and claims a probe batch of its own; each answer doubles the delay again, so three
    workers make three probes and push the next one to 40 s instead of 10 s."""
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    await queue(setup, 5)
    provider = ScriptedProvider()
    provider.script = [DOWN] * 100
    svc = DeliveryService(setup.kernel, providers={"scripted": provider})
    lane = svc.lanes[0]
    assert await svc.run_once() == 5  # the outage opens the circuit
    assert lane.circuit.open
    await setup.clock.advance(5.0)  # the probe is due
    claimed: list[int] = []

    async def worker() -> None:
        claimed.append(await svc.run_once(lane))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(3):  # [providers.scripted] concurrency = 3
                tg.start_soon(worker)
    wait = lane.circuit.wait(setup.clock.monotonic())
    assert (sum(claimed), lane.circuit.probes, wait) == (1, 1, 10.0), (
        f"probe round: {sum(claimed)} messages probed, probes={lane.circuit.probes}, "
        f"next probe in {wait} s")


# -- 4. a provider that hangs (every answer maybe_sent) never opens the circuit ----------

async def test_a_provider_that_never_answers_does_not_turn_the_whole_queue_unknown(
        setup: Setup) -> None:
    """A provider that accepts connections but never answers (read timeouts: maybe_sent)
    is as down as one that refuses them, but the circuit ignores maybe_sent answers: the
    lane keeps handing it full batches, and every message of the queue becomes
    ``unknown`` (never re-sent; each needs an operator's requeue, at the risk of a
    duplicate) instead of one batch and then probes."""
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    await queue(setup, 10)
    hang = SendResult(ok=False, maybe_sent=True,
                      error="postmark: ReadTimeout (may have been sent: not retried)")
    provider = ScriptedProvider(max_batch=2)
    provider.script = [hang] * 100
    svc = DeliveryService(setup.kernel, providers={"scripted": provider})
    for _ in range(5):
        await svc.run_once()
        await setup.clock.advance(1.0)
    async with setup.kernel.store.connect() as conn:
        unknown = (await conn.execute(sa.select(sa.func.count()).where(
            messages.c.status == "unknown"))).scalar_one()
    assert unknown <= 2, f"{unknown} of 10 messages turned unknown in 5 s of a hung provider"


# -- 5. a probe that times out (maybe_sent) declares the provider recovered --------------

async def test_a_probe_without_an_answer_does_not_close_the_circuit(setup: Setup) -> None:
    """``answered()`` closes an open circuit on any batch that is not all outage. A probe
    whose answer never came (maybe_sent: the server now takes the connection but hangs)
    is not 'the provider answered': yet it logs provider.recovered, and the lane goes
    back to whole batches, each of which then turns ``unknown``."""
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    await queue(setup, 6)
    hang = SendResult(ok=False, maybe_sent=True,
                      error="smtp: SMTPTimeoutError (after DATA: may have been sent)")
    provider = ScriptedProvider(max_batch=2)
    provider.script = [DOWN, DOWN] + [hang] * 100
    svc = DeliveryService(setup.kernel, providers={"scripted": provider})
    lane = svc.lanes[0]
    assert await svc.run_once() == 2
    assert lane.circuit.open
    await setup.clock.advance(5.0)
    assert await svc.run_once() == 1  # the probe: no answer
    assert lane.circuit.open, "a probe that got no answer closed the circuit"
