"""Delivery workers on both stores: claim, render, send, record; retries; at-most-once."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pytest
import sqlalchemy as sa
from delivery_harness import (
    NOW,
    ScriptedProvider,
    Setup,
    add_user,
    make_kernel,
    message_row,
    parse,
    service,
)

from segflowd.delivery.outbox import enqueue
from segflowd.delivery.outcomes import backoff
from segflowd.delivery.service import DeliveryService, TokenBucket
from segflowd.providers import SendError, SendResult
from segflowd.schema import messages, subscriptions, suppressions
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture
def setup(store: Store, tmp_path: Path) -> Setup:
    return make_kernel(store, tmp_path)


async def queue(setup: Setup, kind: str = "campaign", template: str = "welcome",
                user: str | None = "u1", to: str | None = None, **data: object) -> int:
    async with setup.kernel.store.begin() as conn:
        mid = await enqueue(conn, kind=kind, template=template,  # type: ignore[arg-type]
                            now=setup.clock.now(), user_id=user, dedupe_key=None,
                            to_address=to, data=data or {"plan": "pro"},
                            campaign="onboarding" if kind == "campaign" else None)
    assert mid is not None
    return mid


async def test_campaign_message_is_rendered_sent_and_recorded(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    provider = ScriptedProvider()
    svc = service(setup, provider)
    sub = setup.kernel.bus.subscribe()
    mid = await queue(setup)
    assert await svc.run_once() == 1
    assert len(provider.sent) == 1
    out = provider.sent[0]
    mime = parse(out.mime)
    assert mime["To"] == "ann@example.org"
    assert mime["Subject"] == "Welcome Ann!"
    assert mime["Reply-To"] == "support@example.com"
    assert mime.get_content_type() == "multipart/alternative"
    assert mime["List-Unsubscribe"].startswith("<https://mail.example.com/u/")
    assert mime["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "Your plan: pro" in mime.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    row = await message_row(setup.kernel.store, mid)
    assert row["status"] == "sent"
    assert row["attempts"] == 1
    assert row["provider_message_id"] == f"p-{mid}"
    assert row["message_id"] == out.message_id
    assert row["sent_at"] == NOW
    events, _missed = sub.drain()
    assert [e.kind for e in events] == ["message.sent"]
    assert events[0].data["message"] == mid
    assert setup.kernel.metrics.value("segflow_messages_total", status="sent") == 1
    assert svc.statistics().sent == 1


async def test_transactional_message_has_no_list_unsubscribe(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    provider = ScriptedProvider()
    svc = service(setup, provider)
    await queue(setup, kind="transaction", template="receipt", amount="$10")
    await svc.run_once()
    mime = parse(provider.sent[0].mime)
    assert mime["List-Unsubscribe"] is None
    assert mime["List-Unsubscribe-Post"] is None
    assert "Receipt for Ann: $10" in mime.get_body(("html",)).get_content()  # type: ignore[union-attr]


async def test_not_due_messages_are_not_claimed(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    provider = ScriptedProvider()
    svc = service(setup, provider)
    mid = await queue(setup)
    async with setup.kernel.store.begin() as conn:
        await conn.execute(sa.update(messages).where(messages.c.id == mid).values(
            next_attempt_at=NOW + dt.timedelta(minutes=5)))
    assert await svc.run_once() == 0
    assert provider.sent == []


async def test_transient_errors_retry_with_backoff_until_the_limit(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    provider = ScriptedProvider()
    provider.script = [SendResult(ok=False, error="429", transient=True)] * 3
    svc = DeliveryService(setup.kernel, providers={"scripted": provider},
                          rng=random.Random(7))
    mid = await queue(setup)
    await svc.run_once()
    row = await message_row(setup.kernel.store, mid)
    assert row["status"] == "queued"
    first_wait = (row["next_attempt_at"] - NOW).total_seconds()
    assert 30.0 <= first_wait <= 60.0  # retry_base 60, half jittered
    assert await svc.run_once() == 0  # not due yet
    setup.clock.set(row["next_attempt_at"])
    await svc.run_once()
    row2 = await message_row(setup.kernel.store, mid)
    assert row2["status"] == "queued"
    second_wait = (row2["next_attempt_at"] - row["next_attempt_at"]).total_seconds()
    assert 60.0 <= second_wait <= 120.0  # doubled
    setup.clock.set(row2["next_attempt_at"])
    await svc.run_once()
    row3 = await message_row(setup.kernel.store, mid)
    assert row3["status"] == "failed"  # max_attempts = 3
    assert row3["attempts"] == 3
    assert row3["last_error"] == "429"
    assert len(provider.sent) == 3


async def test_permanent_error_fails_and_suppresses_when_the_provider_says_so(
        setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "Ann@Example.org", name="Ann")
    provider = ScriptedProvider()
    provider.script = [SendResult(ok=False, error="406 inactive", suppress=True)]
    svc = service(setup, provider)
    first = await queue(setup)
    await svc.run_once()
    assert (await message_row(setup.kernel.store, first))["status"] == "failed"
    async with setup.kernel.store.connect() as conn:
        sup = (await conn.execute(sa.select(suppressions))).mappings().all()
    assert [(s["address"], s["reason"]) for s in sup] == [("ann@example.org", "bounce")]
    second = await queue(setup, kind="transaction", template="receipt", amount="1")
    await svc.run_once()
    assert len(provider.sent) == 1  # the suppressed address got nothing more
    assert (await message_row(setup.kernel.store, second))["status"] == "suppressed"


async def test_crash_after_claiming_queues_the_message_again(setup: Setup) -> None:
    """A claimed row never reached the provider: a restart sends it, once."""
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    mid = await queue(setup)
    crashed = service(setup, ScriptedProvider())
    claimed = await crashed._claim(10, crashed.lanes[0])  # the process dies right after claiming
    assert [r["id"] for r in claimed] == [mid]
    assert (await message_row(setup.kernel.store, mid))["status"] == "claimed"
    provider = ScriptedProvider()
    restarted = service(setup, provider)
    assert await restarted.recover() == []
    row = await message_row(setup.kernel.store, mid)
    assert (row["status"], row["attempts"]) == ("queued", 0)
    assert await restarted.run_once() == 1
    assert (await message_row(setup.kernel.store, mid))["status"] == "sent"
    assert len(provider.sent) == 1


async def test_crash_while_sending_becomes_unknown_and_is_not_resent(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    mid = await queue(setup)
    crashed = service(setup, ScriptedProvider())
    claimed = await crashed._claim(10, crashed.lanes[0])
    # ... marked `sending` right before the provider call, and the process dies there
    assert await crashed.lanes[0].outcomes.mark_sending([mid], claimed[0]["claim"]) == {mid}
    provider = ScriptedProvider()
    restarted = service(setup, provider)
    sub = setup.kernel.bus.subscribe()
    assert await restarted.recover() == [mid]
    assert await restarted.run_once() == 0
    assert provider.sent == []
    row = await message_row(setup.kernel.store, mid)
    assert row["status"] == "unknown"
    assert setup.kernel.metrics.value("segflow_messages_total", status="unknown") == 1
    event, _missed = await sub.receive()
    assert event.kind == "message.unknown"
    # An operator may re-send it on purpose.
    assert await setup.kernel.actions["message.retry"]({"message": mid}) == {
        "message": mid, "status": "queued"}
    await restarted.run_once()
    assert (await message_row(setup.kernel.store, mid))["status"] == "sent"
    assert len(provider.sent) == 1


async def test_retry_action_refuses_a_sent_message(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    svc = service(setup, ScriptedProvider())
    mid = await queue(setup)
    await svc.run_once()
    with pytest.raises(KeyError, match="not failed/unknown"):
        await setup.kernel.actions["message.retry"]({"message": mid})


async def test_unsubscribed_user_gets_no_campaign_but_still_transactional(
        setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    async with setup.kernel.store.begin() as conn:
        await conn.execute(sa.insert(subscriptions).values(
            user_id="u1", topic="marketing", unsubscribed_at=NOW, updated_at=NOW))
    provider = ScriptedProvider()
    svc = service(setup, provider)
    camp = await queue(setup)
    tx = await queue(setup, kind="transaction", template="receipt", amount="1")
    await svc.run_once()
    assert (await message_row(setup.kernel.store, camp))["status"] == "suppressed"
    assert (await message_row(setup.kernel.store, tx))["status"] == "sent"
    assert [m.id for m in provider.sent] == [tx]


async def test_missing_address_and_bad_template_data_fail_without_sending(
        setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", None, name="Ann")
    await add_user(setup.kernel.store, "u2", "bo@example.org", name="Bo")
    provider = ScriptedProvider()
    svc = service(setup, provider)
    no_addr = await queue(setup)
    no_plan = await queue(setup, user="u2", other="x")  # the template needs ``plan``
    await svc.run_once()
    assert provider.sent == []
    r1 = await message_row(setup.kernel.store, no_addr)
    r2 = await message_row(setup.kernel.store, no_plan)
    assert (r1["status"], r2["status"]) == ("failed", "failed")
    assert "no email address" in r1["last_error"]
    assert "'plan' is undefined" in r2["last_error"]


async def test_header_injection_in_data_and_address_cannot_add_headers(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "ann@example.org",
                   name="Ann\r\nBcc: victim@example.net")
    provider = ScriptedProvider()
    svc = service(setup, provider)
    ok = await queue(setup)
    bad = await queue(setup, kind="test", template="receipt", user=None,
                      to="x@example.org\r\nBcc: victim@example.net", amount="1")
    await svc.run_once()
    assert [m.id for m in provider.sent] == [ok]
    mime = parse(provider.sent[0].mime)
    assert mime["Bcc"] is None
    assert mime["Subject"] == "Welcome Ann Bcc: victim@example.net!"
    head = provider.sent[0].mime.split(b"\r\n\r\n", 1)[0]
    assert b"\nBcc:" not in head
    row = await message_row(setup.kernel.store, bad)
    assert row["status"] == "failed"
    assert "line break" in row["last_error"]


async def test_whole_call_that_certainly_sent_nothing_is_transient_for_every_message(
        setup: Setup) -> None:
    """(A plain exception says nothing about what went out: test_delivery_outcomes.)"""
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")

    class Down(ScriptedProvider):
        async def send(self, batch):  # type: ignore[no-untyped-def]
            raise SendError("connection refused", maybe_sent=False)

    svc = service(setup, Down())
    mid = await queue(setup)
    await svc.run_once()
    row = await message_row(setup.kernel.store, mid)
    assert row["status"] == "queued"
    assert "connection refused" in row["last_error"]


async def test_email_test_action_queues_and_sends_with_sample_values(setup: Setup) -> None:
    import anyio

    provider = ScriptedProvider()
    svc = service(setup, provider)
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        result = await setup.kernel.actions["email.test"](
            {"template": "receipt", "to": "qa@example.org", "data": {"amount": "$5"}})
        await svc.drain()
        tg.cancel_scope.cancel()
    assert isinstance(result, dict)
    assert result["status"] == "sent"
    row = await message_row(setup.kernel.store, int(result["message"]))
    assert row["kind"] == "test"
    mime = parse(provider.sent[0].mime)
    assert mime["To"] == "qa@example.org"
    assert mime["List-Unsubscribe"] is None
    # No user: the sample user stands in.
    assert "Receipt for Sample User: $5" in mime.get_body(
        ("html",)).get_content()  # type: ignore[union-attr]


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    waits = [backoff(n, 10.0, 100.0, rng) for n in (1, 2, 3, 4, 5, 6)]
    for n, w in zip((1, 2, 3, 4, 5, 6), waits, strict=True):
        full = min(100.0, 10.0 * 2 ** (n - 1))
        assert full / 2 <= w <= full


async def test_token_bucket_waits_on_the_injected_clock() -> None:
    import anyio

    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=10.0, clock=clock)
    await bucket.acquire(10)  # the full burst at once
    done = anyio.Event()

    async def take() -> None:
        await bucket.acquire(5)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await clock.advance(0.2)
        assert not done.is_set()  # 2 tokens refilled: not enough
        await clock.advance(0.4)
        assert done.is_set()


class Profiles:
    """A context provider (as DirectFlow's preload is): adds template context at send time."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.asked: list[str] = []

    async def context_for(self, user_id: str, data: object) -> dict[str, object]:
        self.asked.append(user_id)
        if self.fail:
            raise ConnectionError("customer database unreachable")
        return {"plan": f"plan-of-{user_id}", "profile": {"tier": "gold"}}


async def test_context_providers_add_template_context_at_send_time(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    provider = ScriptedProvider()
    profiles = Profiles()
    svc = DeliveryService(setup.kernel, providers={"scripted": provider},
                          context_providers=[profiles])
    async with setup.kernel.store.begin() as conn:
        await enqueue(conn, kind="campaign", template="welcome", now=NOW, user_id="u1",
                      dedupe_key=None)
    await svc.run_once()
    assert profiles.asked == ["u1"]
    body = parse(provider.sent[0].mime).get_body(("plain",))
    assert body is not None
    assert "Your plan: plan-of-u1" in body.get_content()


async def test_a_failing_context_provider_retries_the_message_later(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    provider = ScriptedProvider()
    svc = DeliveryService(setup.kernel, providers={"scripted": provider},
                          context_providers=[Profiles(fail=True)])
    mid = await queue(setup)
    await svc.run_once()
    row = await message_row(setup.kernel.store, mid)
    assert provider.sent == []
    assert row["status"] == "queued"
    assert "customer database unreachable" in row["last_error"]
    assert row["next_attempt_at"] > NOW


async def test_render_processes_render_the_batch_and_stop_with_the_service(
        store: Store, tmp_path: Path) -> None:
    """``render_processes``: the same messages, rendered by worker processes."""
    import anyio

    setup = make_kernel(store, tmp_path, options="render_processes = 1")
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    await add_user(setup.kernel.store, "u2", "bo@example.org", name="Bo")
    provider = ScriptedProvider()
    svc = service(setup, provider)
    assert svc.render_pool is not None
    ok = await queue(setup)
    bad = await queue(setup, user="u2", other="x")  # the template needs ``plan``
    tracked = await queue(setup, template="tracked")
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        with anyio.fail_after(60):  # the first batch waits for the workers to start
            while svc.statistics().sent + svc.statistics().failed < 3:
                svc.wake()
                await anyio.sleep(0.05)
        await svc.drain()
        tg.cancel_scope.cancel()
    assert svc.render_pool.batches >= 1
    assert svc.render_pool.worker_pids() == []  # stopped with the service
    assert sorted(m.id for m in provider.sent) == [ok, tracked]
    mime = parse(provider.sent[0].mime)
    assert mime["List-Unsubscribe"].startswith("<https://mail.example.com/u/")
    assert "Your plan: pro" in mime.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = next(m for m in provider.sent if m.id == tracked).html
    assert "https://mail.example.com/t/c/" in html  # tracking still added in the daemon
    row = await message_row(setup.kernel.store, bad)
    assert row["status"] == "failed"
    assert "'plan' is undefined" in row["last_error"]


async def test_a_broken_render_pool_falls_back_to_rendering_in_process(
        store: Store, tmp_path: Path) -> None:
    from segflowd.delivery.renderpool import RenderPoolError

    setup = make_kernel(store, tmp_path, options="render_processes = 1")
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    provider = ScriptedProvider()
    svc = service(setup, provider)
    assert svc.render_pool is not None

    def broken(jobs: object) -> object:
        raise RenderPoolError("render pool: BrokenProcessPool: a worker died")

    svc.render_pool.render_many = broken  # type: ignore[method-assign, assignment]
    mid = await queue(setup)
    assert await svc.run_once() == 1
    assert [m.id for m in provider.sent] == [mid]
    assert (await message_row(setup.kernel.store, mid))["status"] == "sent"
