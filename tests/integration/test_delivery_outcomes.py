"""What becomes of a claimed batch when something goes wrong, on both stores.

No row is left ``sending`` by an error in the process: a message that certainly did not
go out is ``failed`` or ``queued`` again at once, one that may have gone out is
``unknown`` at once (never re-sent by itself), and one that went out is ``sent`` even when
the store refuses some detail of it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from delivery_harness import (
    NOW,
    ScriptedProvider,
    Setup,
    add_user,
    make_kernel,
    message_row,
    service,
)
from sqlalchemy.exc import OperationalError

from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.providers import OutgoingMessage, SendResult
from segflowd.schema import messages
from segflowd.store import Store

pytestmark = pytest.mark.anyio

HOUR = dt.timedelta(hours=1)


@pytest.fixture
def setup(store: Store, tmp_path: Path) -> Setup:
    return make_kernel(store, tmp_path)


async def queue(setup: Setup, user: str, template: str = "welcome", **data: object) -> int:
    async with setup.kernel.store.begin() as conn:
        mid = await enqueue(conn, kind="campaign", template=template, now=setup.clock.now(),
                            user_id=user, dedupe_key=None, data=data or {"plan": "pro"},
                            campaign="onboarding")
    assert mid is not None
    return mid


async def users(setup: Setup, *names: str) -> None:
    for name in names:
        await add_user(setup.kernel.store, name, f"{name}@example.org", name=name.title())


async def statuses(setup: Setup, ids: Sequence[int]) -> list[str]:
    return [str((await message_row(setup.kernel.store, i))["status"]) for i in ids]


class Headlines:
    """A context provider (as a DirectFlow preload is) that hands one user's message a
    string the daemon cannot encode (a lone surrogate, as a badly decoded column gives)."""

    async def context_for(self, user_id: str, data: object) -> dict[str, object]:
        return {"headline": "Sale \udcff" if user_id == "bad" else f"News for {user_id}"}


# -- finding 7: in-process errors resolve the batch at once ---------------------------------

async def test_a_build_error_fails_that_message_at_once_and_the_rest_is_sent(
        setup: Setup) -> None:
    await users(setup, "good", "bad")
    provider = ScriptedProvider()
    svc = DeliveryService(setup.kernel, providers={"scripted": provider},
                          context_providers=[Headlines()])
    good = await queue(setup, "good", template="headline", amount="1")
    bad = await queue(setup, "bad", template="headline", amount="1")
    assert await svc.run_once() == 2
    assert [m.id for m in provider.sent] == [good]
    assert await statuses(setup, [good, bad]) == ["sent", "failed"]
    row = await message_row(setup.kernel.store, bad)
    assert "UnicodeEncodeError" in row["last_error"]
    assert svc.statistics().failed == 1


async def test_an_over_long_provider_message_id_is_recorded_sent_and_clipped(
        setup: Setup) -> None:
    """A provider id longer than the column (a DataError on MariaDB) does not hold the
    batch: both messages are ``sent``, the long id kept as far as it fits."""
    await users(setup, "ann", "bob")
    provider = ScriptedProvider()
    long_id = "x" * 300
    provider.script = [SendResult(ok=True, provider_message_id=long_id),
                       SendResult(ok=True, provider_message_id="p-2")]
    svc = service(setup, provider)
    ids = [await queue(setup, "ann"), await queue(setup, "bob")]
    assert await svc.run_once() == 2
    assert await statuses(setup, ids) == ["sent", "sent"]
    first, second = [await message_row(setup.kernel.store, i) for i in ids]
    assert first["provider_message_id"] == long_id[:255]
    assert second["provider_message_id"] == "p-2"


async def refuse_poison(store: Store) -> None:
    """A trigger that makes the store refuse any update storing the provider id "poison":
    an error of the store on one row that no code path foresaw."""
    async with store.begin() as conn:
        if store.engine.dialect.name == "sqlite":
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_provider_id BEFORE UPDATE ON messages "
                "WHEN NEW.provider_message_id = 'poison' "
                "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END")
        else:
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_provider_id BEFORE UPDATE ON messages FOR EACH ROW "
                "BEGIN IF NEW.provider_message_id = 'poison' THEN "
                "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by a trigger'; "
                "END IF; END")


async def test_a_row_the_store_refuses_is_still_resolved_with_its_batch(setup: Setup) -> None:
    await users(setup, "ann", "bob", "cy")
    await refuse_poison(setup.kernel.store)
    provider = ScriptedProvider()
    provider.script = [SendResult(ok=True, provider_message_id="p-1"),
                       SendResult(ok=True, provider_message_id="poison"),
                       SendResult(ok=False, error="451 busy", transient=True)]
    svc = service(setup, provider)
    sub = setup.kernel.bus.subscribe()
    ids = [await queue(setup, u) for u in ("ann", "bob", "cy")]
    assert await svc.run_once() == 3
    assert await statuses(setup, ids) == ["sent", "sent", "queued"]
    rows = [await message_row(setup.kernel.store, i) for i in ids]
    assert rows[0]["provider_message_id"] == "p-1"
    assert rows[1]["provider_message_id"] is None  # the detail the store refused
    assert "refused by a trigger" in rows[1]["last_error"]
    assert rows[2]["last_error"] == "451 busy"
    events, _missed = sub.drain()
    assert sorted(e.kind for e in events) == ["message.retrying", "message.sent",
                                              "message.sent"]
    assert svc.statistics().sent == 2


class Stalled:
    """A context provider that never answers until cancelled."""

    def __init__(self) -> None:
        self.asked = anyio.Event()

    async def context_for(self, user_id: str, data: object) -> dict[str, object]:
        self.asked.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def test_cancelled_before_anything_was_sent_the_batch_is_queued_again(
        setup: Setup) -> None:
    await users(setup, "ann")
    provider = ScriptedProvider()
    stalled = Stalled()
    svc = DeliveryService(setup.kernel, providers={"scripted": provider},
                          context_providers=[stalled])
    mid = await queue(setup, "ann")
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.run_once)
        with anyio.fail_after(10):
            await stalled.asked.wait()
        tg.cancel_scope.cancel()  # a drain cut short by [daemon] drain_timeout
    assert provider.sent == []
    row = await message_row(setup.kernel.store, mid)
    assert row["status"] == "queued"
    assert row["attempts"] == 0  # no attempt was made
    assert row["next_attempt_at"] == NOW


class StallsInSend(ScriptedProvider):
    """Takes the batch, then never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.sending = anyio.Event()

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.sent.extend(batch)
        self.sending.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def test_cancelled_while_the_provider_has_the_batch_it_is_unknown_at_once(
        setup: Setup) -> None:
    await users(setup, "ann")
    provider = StallsInSend()
    svc = service(setup, provider)
    mid = await queue(setup, "ann")
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.run_once)
        with anyio.fail_after(10):
            await provider.sending.wait()
        tg.cancel_scope.cancel()
    row = await message_row(setup.kernel.store, mid)
    assert row["status"] == "unknown"
    assert "may or may not" in row["last_error"]
    assert setup.kernel.metrics.value("segflow_messages_total", status="unknown") == 1


# -- finding 8: what a provider's failure means ----------------------------------------------

class RaisesAfterSending(ScriptedProvider):
    """A third-party plugin that hands the batch over, then raises an exception of its own."""

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls += 1
        self.sent.extend(batch)
        raise RuntimeError("the API's answer could not be read")


async def test_an_exception_from_a_plugin_is_unknown_and_never_resent(setup: Setup) -> None:
    """A plugin's own exception does not say whether anything went out: conservatively
    every message of the call is ``unknown`` (never sent twice)."""
    await users(setup, "ann", "bob")
    provider = RaisesAfterSending()
    svc = service(setup, provider)
    sub = setup.kernel.bus.subscribe()
    ids = [await queue(setup, "ann"), await queue(setup, "bob")]
    assert await svc.run_once() == 2
    assert await statuses(setup, ids) == ["unknown", "unknown"]
    row = await message_row(setup.kernel.store, ids[0])
    assert "the API's answer could not be read" in row["last_error"]
    events, _missed = sub.drain()
    assert [e.kind for e in events] == ["message.unknown", "message.unknown"]
    assert setup.kernel.metrics.value("segflow_messages_total", status="unknown") == 2
    assert svc.statistics().unknown == 2
    setup.clock.set(NOW + 24 * HOUR)
    assert await svc.run_once() == 0
    assert provider.calls == 1


class ShortAnswer(ScriptedProvider):
    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls += 1
        self.sent.extend(batch)
        return [SendResult(ok=True, provider_message_id="only-one")]


async def test_a_wrong_number_of_results_is_unknown_for_every_message(setup: Setup) -> None:
    await users(setup, "ann", "bob")
    provider = ShortAnswer()
    svc = service(setup, provider)
    ids = [await queue(setup, "ann"), await queue(setup, "bob")]
    await svc.run_once()
    assert await statuses(setup, ids) == ["unknown", "unknown"]
    setup.clock.set(NOW + 24 * HOUR)
    assert await svc.run_once() == 0
    assert provider.calls == 1


async def test_maybe_sent_results_are_unknown_per_message(setup: Setup) -> None:
    await users(setup, "ann", "bob", "cy")
    provider = ScriptedProvider()
    provider.script = [
        SendResult(ok=True, provider_message_id="p-1"),
        SendResult(ok=False, error="read timeout after the request", maybe_sent=True),
        SendResult(ok=False, error="429", transient=True),
    ]
    svc = service(setup, provider)
    ids = [await queue(setup, u) for u in ("ann", "bob", "cy")]
    await svc.run_once()
    assert await statuses(setup, ids) == ["sent", "unknown", "queued"]
    assert (await message_row(setup.kernel.store, ids[1]))["last_error"] == (
        "read timeout after the request")
    setup.clock.set(NOW + 24 * HOUR)
    assert await svc.run_once() == 1  # only the one certainly not sent goes again
    assert [m.id for m in provider.sent] == [*ids, ids[2]]


class Refuses(ScriptedProvider):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls += 1
        raise self.exc


async def test_a_send_error_that_sent_nothing_retries_or_fails_the_batch(
        setup: Setup) -> None:
    from segflowd.providers import SendError

    await users(setup, "ann")
    mid = await queue(setup, "ann")
    svc = service(setup, Refuses(SendError("connection refused", maybe_sent=False)))
    await svc.run_once()
    row = await message_row(setup.kernel.store, mid)
    assert row["status"] == "queued"
    assert "connection refused" in row["last_error"]
    setup.clock.set(NOW + HOUR)
    svc = service(setup, Refuses(SendError("401 bad token", maybe_sent=False,
                                           transient=False)))
    await svc.run_once()
    assert await statuses(setup, [mid]) == ["failed"]


async def test_a_send_error_that_may_have_sent_is_unknown(setup: Setup) -> None:
    from segflowd.providers import SendError

    await users(setup, "ann")
    mid = await queue(setup, "ann")
    svc = service(setup, Refuses(SendError("timed out reading the answer", maybe_sent=True)))
    await svc.run_once()
    row = await message_row(setup.kernel.store, mid)
    assert row["status"] == "unknown"
    assert "timed out reading the answer" in row["last_error"]


async def test_unknown_messages_keep_their_message_id_for_the_providers_logs(
        store: Store, tmp_path: Path) -> None:
    setup = make_kernel(store, tmp_path)
    await users(setup, "ann")
    provider = RaisesAfterSending()
    mid = await queue(setup, "ann")
    await service(setup, provider).run_once()
    row = await message_row(store, mid)
    assert row["status"] == "unknown"
    assert row["message_id"] == provider.sent[0].message_id
    async with store.connect() as conn:
        n = (await conn.execute(sa.text("SELECT COUNT(*) FROM messages WHERE "
                                        "status = 'sending'"))).scalar_one()
    assert n == 0


async def test_a_claim_whose_commit_reply_is_lost_is_queued_again_and_sent_once(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review round 3: the claim's UPDATE to `claimed` committed but the worker heard
    'lost connection'; nothing went to the provider, so the rows go back to `queued` (not
    left claimed until a restart) and are sent once."""
    await users(setup, "ann")
    provider = ScriptedProvider()
    svc = DeliveryService(setup.kernel, providers={"scripted": provider})
    mid = await queue(setup, "ann")
    store = setup.kernel.store
    real_begin = store.begin
    armed = [True]

    @contextlib.asynccontextmanager
    async def begin() -> Any:
        async with real_begin() as conn:
            yield conn
        if armed:  # committed; the worker hears otherwise
            armed.clear()
            raise OperationalError("COMMIT", {}, Exception(
                "(2013, 'Lost connection to server during query')"))

    monkeypatch.setattr(store, "begin", begin)
    with pytest.raises(OperationalError):
        await svc.run_once()
    assert await statuses(setup, [mid]) == ["claimed"]
    await svc.run_once()  # the worker polls again
    assert await statuses(setup, [mid]) == ["sent"]
    assert len(provider.sent) == 1
    async with store.connect() as conn:
        attempts = (await conn.execute(sa.select(messages.c.attempts).where(
            messages.c.id == mid))).scalar()
    assert attempts == 1
