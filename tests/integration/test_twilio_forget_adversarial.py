"""Adversarial cases of deleting Twilio's copies at a forget (review of 09b6ab5).

A message still in flight when its user is forgotten, and a message whose lane is no
longer configured (the [sms] provider renamed): see segflowd/delivery/remotecopies.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from delivery_harness import NOW, message_row
from structlog.testing import capture_logs
from test_sms_delivery import delivery, post_form, queue_sms, routes, sms_setup
from twilio_fake import Answer, FakeTwilio
from twilio_fake import twilio_server as twilio_server

from segflowd.ingest.committer import GroupCommitter
from segflowd.ingest.users import upsert_users
from segflowd.ingest.writes import ForgetWrite
from segflowd.schema import messages
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

ANN = "+14155550100"


@pytest.fixture
async def committer(store: Store) -> AsyncIterator[GroupCommitter]:
    c = GroupCommitter(store, FakeClock(NOW), [])
    async with anyio.create_task_group() as tg:
        await tg.start(c.run)
        yield c
        await c.close()


async def test_a_send_recorded_after_the_forget_is_deleted_without_a_restart(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio,
        committer: GroupCommitter) -> None:
    """The real recorder: Twilio answers only after the forget committed (the row is
    `sending`); the sid is recorded on the forgotten row and the next try deletes it."""
    setup = sms_setup(store, tmp_path, twilio_server)
    async with store.begin() as conn:
        await upsert_users(store, conn, {"ann": [{"name": "Ann", "phone": ANN}]}, NOW)
    ann = await queue_sms(setup, "ann", "reminder", key="a", code="1")
    sid = "SM" + uuid.uuid4().hex
    twilio_server.messages.add(sid)
    twilio_server.fail_to(ANN, Answer(201, {"sid": sid, "status": "queued"}, delay=60))
    async with delivery(setup) as svc:
        committer.sinks = [svc]
        async with anyio.create_task_group() as tg:
            tg.start_soon(svc.run_once)
            for _ in range(1000):
                if (await message_row(store, ann))["status"] == "sending":
                    break
                await anyio.sleep(0.01)
            assert (await message_row(store, ann))["status"] == "sending"
            await committer.submit([ForgetWrite("ann")])
            assert await svc.copies.forget_now() == 0
            assert svc.copies.remote.pending == {ann}  # waiting for its sid
            twilio_server.released.set()  # Twilio answers now
        row = await message_row(store, ann)
        assert row["user_id"] is None
        assert row["to_address"] is None
        assert row["provider_message_id"] == sid
        assert await svc.copies.forget_now() == 1
    assert twilio_server.deleted() == [sid]
    assert (await message_row(store, ann))["provider_message_id"] is None


async def test_a_copy_under_a_provider_no_longer_configured_is_reported(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio,
        committer: GroupCommitter) -> None:
    """[sms] provider renamed: a forgotten user's SMS sent through the old name cannot be
    deleted by this run; its sid is kept (a later start with that lane deletes it) and
    the operator is told, instead of the copy silently staying at Twilio."""
    setup = sms_setup(store, tmp_path, twilio_server)
    async with store.begin() as conn:
        await upsert_users(store, conn, {"ann": [{"name": "Ann", "phone": ANN}]}, NOW)
    ann = await queue_sms(setup, "ann", "reminder", key="a", code="1")
    async with delivery(setup) as svc:
        assert await svc.run_once() == 1
    async with store.begin() as conn:  # sent through the lane before its rename
        await conn.execute(sa.update(messages).where(messages.c.id == ann)
                           .values(provider="oldsms"))
    sid = (await message_row(store, ann))["provider_message_id"]
    async with delivery(setup) as svc:
        committer.sinks = [svc]
        await committer.submit([ForgetWrite("ann")])
        with capture_logs() as logs:
            assert await svc.copies.forget_now() == 0
    assert (await message_row(store, ann))["provider_message_id"] == sid
    unknown = [e for e in logs if e["event"] == "delivery.remote_copies_unknown_provider"]
    assert [e["messages"] for e in unknown] == [1]
    assert all(str(sid) not in repr(e) for e in logs)


async def test_a_404_that_is_not_twilios_leaves_the_copy_pending(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio,
        committer: GroupCommitter) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    async with store.begin() as conn:
        await upsert_users(store, conn, {"ann": [{"name": "Ann", "phone": ANN}]}, NOW)
    ann = await queue_sms(setup, "ann", "reminder", key="a", code="1")
    async with delivery(setup) as svc:
        assert await svc.run_once() == 1
    sid = (await message_row(store, ann))["provider_message_id"]
    twilio_server.fail_next(Answer(404, b"<html>Not Found</html>"))  # a proxy, not Twilio
    async with delivery(setup) as svc:
        committer.sinks = [svc]
        await committer.submit([ForgetWrite("ann")])
        assert await svc.copies.forget_now() == 0
    assert sid in twilio_server.messages  # Twilio still has it
    assert (await message_row(store, ann))["provider_message_id"] == sid


async def test_the_sid_of_a_message_in_doubt_learnt_from_its_callback_is_deleted(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio,
        committer: GroupCommitter) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    async with store.begin() as conn:
        await upsert_users(store, conn, {"ann": [{"name": "Ann", "phone": ANN}]}, NOW)
    ann = await queue_sms(setup, "ann", "reminder", key="a", code="1")
    twilio_server.fail_next(Answer(drop=True))  # Twilio took it; its answer never came
    async with delivery(setup) as svc:
        await svc.run_once()
    row = await message_row(store, ann)
    assert row["status"] == "unknown"
    assert row["provider_message_id"] is None
    sid = "SM" + uuid.uuid4().hex
    twilio_server.messages.add(sid)
    async with delivery(setup) as svc:
        committer.sinks = [svc]
        await committer.submit([ForgetWrite("ann")])
        report = await post_form(routes(setup), f"/webhooks/sms/status?m={ann}",
                                 {"MessageSid": sid, "MessageStatus": "delivered"})
        assert report.json()["matched"] is True
        await svc.copies.remote.sweep()  # as the next start does
        await svc.copies.forget_now()
    assert twilio_server.deleted() == [sid]


async def test_a_new_forget_does_not_re_ask_a_copy_twilio_just_refused(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio,
        committer: GroupCommitter) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    async with store.begin() as conn:
        await upsert_users(store, conn, {"ann": [{"name": "Ann", "phone": ANN}],
                                         "bob": [{"name": "Bob", "phone": "+14155550101"}]},
                           NOW)
    ann = await queue_sms(setup, "ann", "reminder", key="a", code="1")
    bob = await queue_sms(setup, "bob", "reminder", key="b", code="2")
    async with delivery(setup) as svc:
        assert await svc.run_once() == 2
    ann_sid = str((await message_row(store, ann))["provider_message_id"])
    bob_sid = str((await message_row(store, bob))["provider_message_id"])
    twilio_server.not_final.add(ann_sid)  # Twilio keeps refusing ann's (20009)

    def asked(sid: str) -> int:
        return sum(1 for r in twilio_server.requests
                   if r.method == "DELETE" and r.path.endswith(f"/{sid}.json"))

    async with delivery(setup) as svc:
        committer.sinks = [svc]
        async with anyio.create_task_group() as tg:
            tg.start_soon(svc.copies.run)
            await committer.submit([ForgetWrite("ann")])
            with anyio.fail_after(10):
                while not asked(ann_sid):  # noqa: ASYNC110 - a thread's list, no event
                    await anyio.sleep(0.01)
            await committer.submit([ForgetWrite("bob")])
            with anyio.fail_after(10):
                while not asked(bob_sid):  # noqa: ASYNC110 - a thread's list, no event
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert twilio_server.deleted() == [bob_sid]
    assert asked(ann_sid) == 1  # refused a moment ago: its retry is RETRY_DELAY away
