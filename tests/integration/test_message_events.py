"""Per-message outcomes for reports: Postmark and SES webhooks and the unsubscribe link
record delivered / bounced / complained / unsubscribed once per message, on both stores."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from delivery_harness import NOW, Setup, make_kernel
from test_webhooks import BOUNCE, CERT, TOPIC, basic, notification, sns_sign

from segflowd.delivery.tokens import Signer
from segflowd.delivery.tracking import Tracking
from segflowd.delivery.webhooks import SnsVerifier, Webhooks
from segflowd.http import Router
from segflowd.schema import message_events, messages
from segflowd.store import Store

pytestmark = pytest.mark.anyio


class Env:
    def __init__(self, http: httpx.AsyncClient, store: Store, setup: Setup) -> None:
        self.http, self.store, self.setup = http, store, setup

    async def events(self) -> list[tuple[int, str, str | None, int | None]]:
        e = message_events.c
        async with self.store.connect() as conn:
            rows = await conn.execute(sa.select(e.message_id, e.kind, e.campaign, e.step)
                                      .order_by(e.message_id, e.kind))
            return [(int(r[0]), str(r[1]), r[2], r[3]) for r in rows]


@pytest.fixture
async def env(store: Store, tmp_path: Path) -> AsyncIterator[Env]:
    setup = make_kernel(store, tmp_path, provider="pm", options=(
        'plugin = "postmark"\nserver_token = "t"\nwebhook_username = "hook"\n'
        'webhook_password = "s3cret"\n'
        f'[providers.ses]\nplugin = "ses"\nregion = "eu-west-1"\nwebhook_topic_arn = "{TOPIC}"\n'))
    async with store.begin() as conn:
        await conn.execute(sa.insert(messages), [
            {"id": i, "user_id": "u1", "kind": "campaign", "campaign": "welcome", "step": i,
             "template": "w", "status": "sent", "provider_message_id": pid,
             "created_at": NOW, "updated_at": NOW}
            for i, pid in ((1, "pm-1"), (2, "pm-2"), (3, "ses-3"), (4, "ses-4"), (5, None))])

    async def fetch(url: str) -> bytes:  # stands in for the HTTPS fetch from amazonaws.com
        return CERT

    router = Router()
    Webhooks(setup.kernel, sns=SnsVerifier(fetch)).register_routes(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router),
                                 base_url="http://segflow") as http:
        yield Env(http, store, setup)


async def test_postmark_delivery_bounce_and_complaint_are_recorded_once(env: Env) -> None:
    auth = basic("hook", "s3cret")
    for body in (
            {"RecordType": "Delivery", "MessageID": "pm-1", "Recipient": "a@example.org"},
            {"RecordType": "Delivery", "MessageID": "pm-1", "Recipient": "a@example.org"},
            {"RecordType": "SpamComplaint", "MessageID": "pm-1", "Email": "a@example.org"},
            {"RecordType": "Bounce", "Type": "HardBounce", "MessageID": "pm-2",
             "Email": "b@example.org", "Inactive": True},
            {"RecordType": "Delivery", "MessageID": "not-ours"},
            {"RecordType": "Open", "MessageID": "pm-2"}):
        r = await env.http.post("/webhooks/postmark", headers=auth, json=body)
        assert r.status_code == 200, r.text
    assert await env.events() == [(1, "complained", "welcome", 1), (1, "delivered", "welcome", 1),
                                  (2, "bounced", "welcome", 2)]


async def test_ses_delivery_bounce_and_complaint_are_recorded_by_mail_message_id(
        env: Env) -> None:
    notes = (
        {"notificationType": "Delivery", "mail": {"messageId": "ses-3"},
         "delivery": {"recipients": ["a@example.org"]}},
        {**BOUNCE, "mail": {"messageId": "ses-4"}},
        {"notificationType": "Complaint", "mail": {"messageId": "ses-3"},
         "complaint": {"complaintFeedbackType": "abuse",
                       "complainedRecipients": [{"emailAddress": "a@example.org"}]}},
        {"notificationType": "Delivery", "mail": {"messageId": "pm-404"}},
    )
    for note in notes:
        r = await env.http.post("/webhooks/ses", content=json.dumps(sns_sign(notification(note))))
        assert r.status_code == 200, r.text
    assert await env.events() == [(3, "complained", "welcome", 3), (3, "delivered", "welcome", 3),
                                  (4, "bounced", "welcome", 4)]


async def test_an_unsubscribe_link_records_its_message_once(env: Env) -> None:
    tracking = Tracking(env.setup.kernel, Signer("k" * 32))
    await tracking.apply_unsubscribe({"u": "u1", "m": 5})
    await tracking.apply_unsubscribe({"u": "u1", "m": 5})
    await tracking.apply_unsubscribe({"a": "x@example.org", "m": 404})  # no such message
    assert await env.events() == [(5, "unsubscribed", "welcome", 5)]
