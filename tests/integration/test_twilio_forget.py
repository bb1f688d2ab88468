"""Forgetting a user deletes Twilio's copies of the SMS sent to them (issue #19).

The real twilio plugin against the Twilio-shaped server on loopback: the forget commits
through the group committer, delivery (an ingest sink) asks Twilio to DELETE each of the
user's messages by its sid and clears the sid of those gone; what Twilio cannot delete
yet stays pending, and the start sweeps what a dead process left.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from delivery_harness import NOW, Setup, message_row
from test_sms_delivery import close, delivery, queue_sms, sms_setup
from twilio_fake import FakeTwilio, twilio_error
from twilio_fake import twilio_server as twilio_server

from segflowd.delivery.service import DeliveryService
from segflowd.ingest.committer import GroupCommitter
from segflowd.ingest.users import upsert_users
from segflowd.ingest.writes import ForgetWrite
from segflowd.schema import messages
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture
async def committer(store: Store) -> AsyncIterator[GroupCommitter]:
    c = GroupCommitter(store, FakeClock(NOW), [])
    async with anyio.create_task_group() as tg:
        await tg.start(c.run)
        yield c
        await c.close()


async def _sent(setup: Setup, twilio: FakeTwilio) -> tuple[int, int]:
    """One SMS sent through twilio to ann and one to bob: their message ids."""
    async with setup.kernel.store.begin() as conn:
        await upsert_users(setup.kernel.store, conn, {
            "ann": [{"name": "Ann", "phone": "+14155550100"}],
            "bob": [{"name": "Bob", "phone": "+14155550101"}]}, NOW)
    ann = await queue_sms(setup, "ann", "reminder", key="a", code="1")
    bob = await queue_sms(setup, "bob", "reminder", key="b", code="2")
    async with delivery(setup) as svc:
        assert await svc.run_once() == 2
    assert len(twilio.sent()) == 2
    return ann, bob


async def _sid(setup: Setup, mid: int) -> object:
    return (await message_row(setup.kernel.store, mid))["provider_message_id"]


async def test_a_forget_deletes_twilios_copy_and_clears_the_sid(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio,
        committer: GroupCommitter) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    ann, bob = await _sent(setup, twilio_server)
    ann_sid, bob_sid = await _sid(setup, ann), await _sid(setup, bob)
    async with delivery(setup) as svc:
        committer.sinks = [svc]
        await committer.submit([ForgetWrite("ann")])
        assert svc.copies.remote.pending == {ann}
        assert await svc.copies.forget_now() == 1
        assert svc.copies.remote.pending == set()
    assert twilio_server.deleted() == [ann_sid]
    assert twilio_server.requests[-1].path.endswith(f"/Messages/{ann_sid}.json")
    row = await message_row(store, ann)
    assert row["provider_message_id"] is None
    assert row["status"] == "sent"
    assert await _sid(setup, bob) == bob_sid  # another user's message is never deleted
    assert bob_sid in twilio_server.messages


async def test_a_message_not_yet_final_is_deleted_at_a_later_try(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio,
        committer: GroupCommitter) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    ann, bob = await _sent(setup, twilio_server)
    ann_sid = await _sid(setup, ann)
    twilio_server.not_final.add(str(ann_sid))
    async with delivery(setup) as svc:
        committer.sinks = [svc]
        await committer.submit([ForgetWrite("ann")])
        assert await svc.copies.forget_now() == 0
        assert [r.answered for r in twilio_server.requests if r.method == "DELETE"] == [409]
        assert svc.copies.remote.pending == {ann}  # retried after RETRY_DELAY
        assert await _sid(setup, ann) == ann_sid
        twilio_server.not_final.clear()  # Twilio finished delivering it
        assert await svc.copies.forget_now() == 1
    assert twilio_server.deleted() == [ann_sid]
    assert await _sid(setup, ann) is None
    assert await _sid(setup, bob) is not None


async def test_a_5xx_leaves_it_pending_and_a_404_is_already_gone(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio,
        committer: GroupCommitter) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    ann, _ = await _sent(setup, twilio_server)
    ann_sid = await _sid(setup, ann)
    twilio_server.fail_next(twilio_error(503, 20503, "Service unavailable"))
    async with delivery(setup) as svc:
        committer.sinks = [svc]
        await committer.submit([ForgetWrite("ann")])
        assert await svc.copies.forget_now() == 0
        assert svc.copies.remote.pending == {ann}
        assert await _sid(setup, ann) == ann_sid
        twilio_server.messages.discard(str(ann_sid))  # deleted in Twilio's console meanwhile
        assert await svc.copies.forget_now() == 1
    assert [r.answered for r in twilio_server.requests if r.method == "DELETE"] == [503, 404]
    assert await _sid(setup, ann) is None


async def test_the_start_deletes_a_copy_a_dead_process_left(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio,
        committer: GroupCommitter) -> None:
    """The forget committed but the process died before the DELETE: the next start
    finds the forgotten message still holding its sid and deletes Twilio's copy."""
    setup = sms_setup(store, tmp_path, twilio_server)
    ann, bob = await _sent(setup, twilio_server)
    ann_sid, bob_sid = await _sid(setup, ann), await _sid(setup, bob)
    await committer.submit([ForgetWrite("ann")])  # delivery was not told
    assert twilio_server.deleted() == []
    again = DeliveryService(setup.kernel)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(again.copies.run)  # the start's sweep
            for _ in range(500):
                if again.copies.remote.deleted:
                    break
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    finally:
        await close(again)
    assert again.copies.remote.deleted == 1
    assert twilio_server.deleted() == [ann_sid]
    assert await _sid(setup, ann) is None
    assert await _sid(setup, bob) == bob_sid


async def test_a_message_being_sent_at_the_forget_is_deleted_once_its_sid_is_known(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio,
        committer: GroupCommitter) -> None:
    """A message in flight (`sending`, no sid yet) when the forget commits stays pending;
    once delivery records Twilio's answer (its sid), the next try deletes it."""
    setup = sms_setup(store, tmp_path, twilio_server)
    ann, _ = await _sent(setup, twilio_server)
    ann_sid = await _sid(setup, ann)
    async with store.begin() as conn:  # back to the moment before the outcome is recorded
        await conn.execute(sa.update(messages).where(messages.c.id == ann).values(
            status="sending", provider_message_id=None))
    async with delivery(setup) as svc:
        committer.sinks = [svc]
        await committer.submit([ForgetWrite("ann")])
        assert await svc.copies.forget_now() == 0
        assert svc.copies.remote.pending == {ann}
        assert twilio_server.deleted() == []
        async with store.begin() as conn:  # the send's outcome is recorded
            await conn.execute(sa.update(messages).where(messages.c.id == ann).values(
                status="sent", provider_message_id=ann_sid))
        assert await svc.copies.forget_now() == 1
    assert twilio_server.deleted() == [ann_sid]
    assert await _sid(setup, ann) is None
