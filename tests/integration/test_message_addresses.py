"""``messages.to_address`` records the address a message was sent to (or would have been),
for every kind of mail, and a forget while the message is with the provider keeps it
forgotten."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import httpx
import pytest
import sqlalchemy as sa
from delivery_harness import ScriptedProvider, Setup, add_user, make_kernel, message_row, service

from segflowd.delivery.outbox import MessageKind, enqueue
from segflowd.http import Router
from segflowd.ingest.service import IngestService
from segflowd.ingest.users import forget
from segflowd.providers import OutgoingMessage, SendResult
from segflowd.schema import users
from segflowd.store import Store

pytestmark = pytest.mark.anyio

ANN = "ann@example.org"


@pytest.fixture
def setup(store: Store, tmp_path: Path) -> Setup:
    return make_kernel(store, tmp_path)


async def queue(setup: Setup, kind: MessageKind = "campaign", user: str = "u1") -> int:
    async with setup.kernel.store.begin() as conn:
        mid = await enqueue(conn, kind=kind, template="welcome", now=setup.clock.now(),
                            user_id=user, dedupe_key=None, data={"plan": "pro"},
                            campaign="onboarding" if kind == "campaign" else None)
    assert mid is not None
    return mid


@pytest.mark.parametrize("kind", ["campaign", "transaction", "broadcast"])
async def test_a_sent_message_records_the_users_address(setup: Setup, kind: MessageKind) -> None:
    await add_user(setup.kernel.store, "u1", ANN, name="Ann")
    mid = await queue(setup, kind)
    assert (await message_row(setup.kernel.store, mid))["to_address"] is None  # queued
    assert await service(setup, ScriptedProvider()).run_once() == 1
    row = await message_row(setup.kernel.store, mid)
    assert (row["status"], row["to_address"]) == ("sent", ANN)


async def test_the_address_is_the_one_at_send_time(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", "old@example.org", name="Ann")
    mid = await queue(setup)
    async with setup.kernel.store.begin() as conn:  # the user changed address meanwhile
        await conn.execute(sa.update(users).where(users.c.id == "u1").values(email=ANN))
    assert await service(setup, ScriptedProvider()).run_once() == 1
    assert (await message_row(setup.kernel.store, mid))["to_address"] == ANN


async def test_a_failed_and_a_suppressed_message_record_the_address(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", ANN, name="Ann")
    await add_user(setup.kernel.store, "u2", "not an address", name="Bo")
    provider = ScriptedProvider()
    provider.script = [SendResult(ok=False, error="smtp 550 no such user", suppress=True)]
    failed = await queue(setup)
    bad = await queue(setup, user="u2")
    assert await service(setup, provider).run_once() == 2
    row = await message_row(setup.kernel.store, failed)
    assert (row["status"], row["to_address"]) == ("failed", ANN)
    row = await message_row(setup.kernel.store, bad)
    assert (row["status"], row["to_address"]) == ("failed", "not an address")
    suppressed = await queue(setup)  # the bounce suppressed ann's address
    assert await service(setup, ScriptedProvider()).run_once() == 1
    row = await message_row(setup.kernel.store, suppressed)
    assert (row["status"], row["to_address"]) == ("suppressed", ANN)


async def test_a_message_queued_again_resolves_its_address_again(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", ANN, name="Ann")
    provider = ScriptedProvider()
    provider.script = [SendResult(ok=False, error="try later", transient=True)]
    mid = await queue(setup)
    assert await service(setup, provider).run_once() == 1
    row = await message_row(setup.kernel.store, mid)
    assert (row["status"], row["to_address"]) == ("queued", None)


class ForgettingProvider(ScriptedProvider):
    """Forgets the user while it holds their message (status ``sending``), then fails it
    with an error that quotes the address."""

    def __init__(self, setup: Setup) -> None:
        super().__init__()
        self.setup = setup

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        async with self.setup.kernel.store.begin() as conn:
            await forget(conn, "u1", self.setup.clock.now())
        self.sent.extend(batch)
        return [SendResult(ok=False, error=f"smtp 550 <{ANN}>: no such user") for _ in batch]


async def test_a_user_forgotten_while_sending_gets_no_address_back(setup: Setup) -> None:
    await add_user(setup.kernel.store, "u1", ANN, name="Ann")
    mid = await queue(setup)
    provider = ForgettingProvider(setup)
    assert await service(setup, provider).run_once() == 1
    assert len(provider.sent) == 1  # it was handed over before the forget
    row = await message_row(setup.kernel.store, mid)
    assert row["status"] == "failed"  # the outcome is recorded ...
    assert (row["user_id"], row["to_address"], row["last_error"]) == (None, None, None)


async def test_get_user_lists_messages_with_their_address_and_error(
        store: Store, tmp_path: Path) -> None:
    keys = '\n[[http.keys]]\nname = "site"\nsecret = "k"\n'
    setup = make_kernel(store, tmp_path, email_extra=keys)
    await add_user(store, "u1", ANN, name="Ann")
    provider = ScriptedProvider()
    provider.script = [SendResult(ok=False, error="smtp 550 no such user")]
    failed = await queue(setup)
    assert await service(setup, provider).run_once() == 1
    waiting = await queue(setup, "transaction")
    ingest = IngestService(setup.kernel)
    router = Router()
    ingest.register_routes(router)
    async with anyio.create_task_group() as tg:
        await tg.start(ingest.run)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router),
                                     base_url="http://segflow") as http:
            r = await http.get("/v1/users/u1", headers={"Authorization": "Bearer k"})
        await ingest.drain()
        tg.cancel_scope.cancel()
    assert r.status_code == 200, r.text
    shown = [(m["id"], m["kind"], m["to"], m["status"], m["error"])
             for m in r.json()["messages"]]
    assert shown == [(waiting, "transaction", None, "queued", None),
                     (failed, "campaign", ANN, "failed", "smtp 550 no such user")]
