"""A marketing SMS of a topic the user left is not sent; STOP still stops every marketing
SMS and a transactional one still goes. Both stores, the real twilio plugin."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from delivery_harness import NOW, message_row
from test_sms_delivery import delivery, sms_setup
from twilio_fake import FakeTwilio
from twilio_fake import twilio_server as twilio_server

from segflowd.delivery.outbox import enqueue
from segflowd.ingest.users import upsert_users
from segflowd.schema import subscriptions
from segflowd.store import Store

pytestmark = pytest.mark.anyio


async def test_an_sms_of_a_left_topic_is_suppressed(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    async with store.begin() as conn:
        await upsert_users(store, conn, {
            "ann": [{"name": "Ann", "phone": "+1 415 555 0100"}],
            "bob": [{"name": "Bob", "phone": "+1 415 555 0101"}]}, NOW)
        await conn.execute(sa.insert(subscriptions), [
            {"user_id": "ann", "topic": "offers", "unsubscribed_at": NOW, "updated_at": NOW},
            {"user_id": "bob", "topic": "sms", "unsubscribed_at": NOW, "updated_at": NOW}])
    ids: dict[str, int] = {}
    async with store.begin() as conn:
        for key, user, kind, topic in [("ann-offers", "ann", "campaign", "offers"),
                                       ("ann-news", "ann", "campaign", "news"),
                                       ("ann-plain", "ann", "broadcast", None),
                                       ("ann-otp", "ann", "transaction", None),
                                       ("bob-news", "bob", "campaign", "news")]:
            mid = await enqueue(conn, kind=kind, template="otp",  # type: ignore[arg-type]
                                now=NOW, user_id=user, dedupe_key=key, data={"code": "1"},
                                channel="sms", topic=topic)
            assert mid is not None
            ids[key] = mid
    async with delivery(setup) as svc:
        await svc.run_once()
    status = {k: ((r := await message_row(store, m))["status"], r["last_error"])
              for k, m in ids.items()}
    assert status["ann-offers"] == ("suppressed", "user unsubscribed from topic 'offers'")
    assert status["ann-news"][0] == "sent"
    assert status["ann-plain"][0] == "sent"
    assert status["ann-otp"][0] == "sent"
    assert status["bob-news"] == ("suppressed", "user unsubscribed from SMS (STOP)")
    assert len(twilio_server.sent()) == 3
