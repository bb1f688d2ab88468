"""SMS through the outbox: the real twilio plugin against a Twilio-shaped server on
loopback, the status callback and replies through the daemon's routes, quiet hours under
a fake clock, and subscriptions (STOP stops marketing SMS, never transactional)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import textwrap
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from delivery_harness import NOW, Setup, add_user, make_kernel, message_row
from twilio_fake import ACCOUNT_SID, AUTH_TOKEN, FakeTwilio
from twilio_fake import twilio_server as twilio_server

from segflowd.config import load_config
from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.delivery.smshooks import SmsHooks
from segflowd.http import Router
from segflowd.ingest.users import read_user, upsert_users
from segflowd.loader import load_app
from segflowd.schema import messages, segment_members, subscriptions
from segflowd.sources.broadcasts import BroadcastService
from segflowd.store import Store
from segflowd.twiliosig import twilio_signature

pytestmark = pytest.mark.anyio

PUBLIC = "https://mail.example.com"
SMS_APP = """
app.sms_template("reminder", text="Hi {{ user.name }}, your code is {{ code }}.")
app.sms_template("otp", text="Code {{ code }}")
"""


def sms_setup(store: Store, base: Path, twilio: FakeTwilio, quiet: str = "") -> Setup:
    """The harness's kernel with the SMS templates, an [sms] section and the twilio
    plugin pointed at ``twilio``; users without a time zone are in New York."""
    sms = textwrap.dedent(f"""\
        [sms]
        provider = "sms"
        quiet_hours = "{quiet}"
        help_text = "Example Co: reply STOP to stop."
        [providers.sms]
        plugin = "twilio"
        account_sid = "{ACCOUNT_SID}"
        auth_token = "{AUTH_TOKEN}"
        from = "+15005550006"
        base_url = "{twilio.url}"
        """)
    setup = make_kernel(store, base, provider="outbox", options='path = "outbox"',
                        email_extra=sms)
    flows = base / "flows.py"
    flows.write_text(flows.read_text() + SMS_APP)
    config = load_config(base / "segflow.toml",
                         environ={"SEGFLOW_DAEMON_DEFAULT_TIMEZONE": "America/New_York"})
    kernel = dataclasses.replace(setup.kernel, config=config, app=load_app(str(flows), base))
    return Setup(kernel, setup.clock, config)


async def queue_sms(setup: Setup, user_id: str, template: str, kind: str = "campaign",
                    key: str = "k1", **data: object) -> int:
    async with setup.kernel.store.begin() as conn:
        mid = await enqueue(conn, kind=kind, template=template, now=setup.clock.now(),  # type: ignore[arg-type]
                            user_id=user_id, dedupe_key=key, data=data, channel="sms")
    assert mid is not None
    return mid


@contextlib.asynccontextmanager
async def delivery(setup: Setup) -> AsyncIterator[DeliveryService]:
    """A delivery service whose providers' connections are closed after the block."""
    svc = DeliveryService(setup.kernel)
    try:
        yield svc
    finally:
        await close(svc)


async def close(svc: DeliveryService) -> None:
    for lane in svc.lanes:
        if lane.loaded is not None:
            await lane.loaded.aclose()


def sign(url: str, form: dict[str, str]) -> str:
    return twilio_signature(AUTH_TOKEN, url, form)


async def post_form(router: Router, path: str, form: dict[str, str],
                    signature: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/x-www-form-urlencoded",
               "x-twilio-signature": signature if signature is not None
               else sign(PUBLIC + path, form)}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router),
                                 base_url="http://daemon") as client:
        return await client.post(path, content=urllib.parse.urlencode(form), headers=headers)


def routes(setup: Setup) -> Router:
    router = Router()
    SmsHooks(setup.kernel).register_routes(router)
    return router


async def test_send_sms_reaches_twilio_with_the_e164_number(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    async with store.begin() as conn:
        await upsert_users(store, conn, {"ann": [{"name": "Ann",
                                                  "phone": "+1 (415) 555-0100"}]}, NOW)
    async with store.connect() as conn:
        view = await read_user(conn, "ann")
    assert view is not None
    assert view.attributes["phone"] == "+14155550100"
    mid = await queue_sms(setup, "ann", "reminder", code="42")
    async with delivery(setup) as svc:
        assert await svc.run_once() == 1
    [req] = twilio_server.sent()
    assert req.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert req.form["To"] == "+14155550100"
    assert req.form["From"] == "+15005550006"
    assert req.form["Body"] == "Hi Ann, your code is 42."
    assert req.form["StatusCallback"] == f"{PUBLIC}/webhooks/sms/status?m={mid}"
    row = await message_row(store, mid)
    assert row["status"] == "sent"
    assert row["channel"] == "sms"
    assert row["provider_message_id"] == req.sid
    assert row["to_address"] == "+14155550100"
    assert setup.kernel.metrics.value("segflow_channel_messages_total", channel="sms",
                                      status="sent") == 1

    # The status callback: a forged one changes nothing, a signed one is recorded.
    router = routes(setup)
    path = "/webhooks/sms/status"
    form = {"MessageSid": req.sid, "MessageStatus": "undelivered", "ErrorCode": "30003"}
    forged = await post_form(router, path, form, signature=sign(PUBLIC + path, {
        **form, "MessageStatus": "delivered"}))
    assert forged.status_code == 403
    assert (await message_row(store, mid))["status"] == "sent"
    ok = await post_form(router, path, form)
    assert ok.status_code == 200
    assert ok.json()["matched"] is True
    row = await message_row(store, mid)
    assert row["status"] == "failed"
    assert "30003" in str(row["last_error"])
    assert row["response"]["delivery"] == "undelivered"


async def test_an_invalid_number_fails_without_a_request(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    async with store.begin() as conn:
        await upsert_users(store, conn, {"bob": [{"phone": "555-0100"}]}, NOW)
    async with store.connect() as conn:
        view = await read_user(conn, "bob")
    assert view is not None
    assert "country code" in str(view.as_json()["phone_error"])
    mid = await queue_sms(setup, "bob", "otp", kind="transaction", code="1")
    async with delivery(setup) as svc:
        await svc.run_once()
    row = await message_row(store, mid)
    assert row["status"] == "failed"
    assert "country code" in str(row["last_error"])
    assert twilio_server.requests == []


async def test_stop_start_and_help(store: Store, tmp_path: Path,
                                   twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    await add_user(store, "cat", None, name="Cat", phone="+14155550101")
    router = routes(setup)
    inbound = "/webhooks/sms/inbound"
    stop = {"From": "+14155550101", "To": "+15005550006", "Body": " stop "}
    assert (await post_form(router, inbound, stop, signature="bad")).status_code == 403
    assert (await post_form(router, inbound, stop)).status_code == 200
    async with store.connect() as conn:
        sub = (await conn.execute(sa.select(subscriptions).where(
            subscriptions.c.user_id == "cat"))).mappings().one()
    assert sub["topic"] == "sms"
    assert sub["unsubscribed_at"] is not None
    marketing = await queue_sms(setup, "cat", "reminder", key="m1", code="1")
    receipt = await queue_sms(setup, "cat", "otp", kind="transaction", key="t1", code="2")
    svc = DeliveryService(setup.kernel)
    await svc.run_once()
    assert (await message_row(store, marketing))["status"] == "suppressed"
    assert (await message_row(store, receipt))["status"] == "sent"
    assert [r.form["Body"] for r in twilio_server.sent()] == ["Code 2"]

    start = {**stop, "Body": "START"}
    assert (await post_form(router, inbound, start)).status_code == 200
    again = await queue_sms(setup, "cat", "reminder", key="m2", code="3")
    await svc.run_once()
    assert (await message_row(store, again))["status"] == "sent"

    help_reply = await post_form(router, inbound, {**stop, "Body": "HELP"})
    assert help_reply.status_code == 200
    assert "<Message>Example Co: reply STOP to stop.</Message>" in help_reply.text
    await close(svc)


async def test_quiet_hours_hold_marketing_until_they_end(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server, quiet="21:00-08:00")
    # NOW is the harness's epoch; put the clock at 23:30 in New York (the default zone).
    ny_late = dt.datetime.combine(NOW.date(), dt.time(23, 30)).replace(
        tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    setup.clock.set(ny_late.astimezone(dt.UTC).replace(tzinfo=None))
    await add_user(store, "dan", None, name="Dan", phone="+14155550102")
    await add_user(store, "eve", None, name="Eve", phone="+33612345678",
                   timezone="Europe/Paris")  # 05:30 in Paris: quiet too
    marketing = await queue_sms(setup, "dan", "reminder", key="m1", code="1")
    paris = await queue_sms(setup, "eve", "reminder", key="m2", code="1")
    otp = await queue_sms(setup, "dan", "otp", kind="transaction", key="t1", code="9")
    svc = DeliveryService(setup.kernel)
    await svc.run_once()
    row = await message_row(store, marketing)
    assert row["status"] == "queued"
    assert row["attempts"] == 0
    # Held until 08:00 New York time (13:00 UTC the next day), not dropped.
    held_until = dt.datetime.combine(NOW.date() + dt.timedelta(days=1), dt.time(13, 0))
    assert row["next_attempt_at"] == held_until
    paris_row = await message_row(store, paris)
    assert paris_row["next_attempt_at"] == dt.datetime.combine(
        NOW.date() + dt.timedelta(days=1), dt.time(7, 0))  # 08:00 in Paris, CET
    assert (await message_row(store, otp))["status"] == "sent"  # transactional: no hold
    assert [r.form["Body"] for r in twilio_server.sent()] == ["Code 9"]

    setup.clock.set(paris_row["next_attempt_at"])
    await svc.run_once()
    assert (await message_row(store, paris))["status"] == "sent"
    assert (await message_row(store, marketing))["status"] == "queued"
    setup.clock.set(held_until)
    await svc.run_once()
    assert (await message_row(store, marketing))["status"] == "sent"
    assert len(twilio_server.sent()) == 3
    await close(svc)


async def test_a_broadcast_of_an_sms_template_queues_sms(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    for i in range(3):
        await add_user(store, f"b{i}", None, name=f"B{i}", phone=f"+1415555010{i}")
    async with store.begin() as conn:
        await conn.execute(sa.insert(segment_members), [
            {"segment": "everyone", "user_id": f"b{i}", "entered_at": NOW,
             "evaluated_at": NOW} for i in range(3)])
    kernel = setup.kernel
    kernel.app.segment("everyone", sql="SELECT id FROM users")
    broadcasts = BroadcastService(kernel)
    bid = await broadcasts.launch(segment="everyone", template="reminder", rate=10,
                                  data={"code": "B"})
    await broadcasts.step(bid)
    async with store.connect() as conn:
        rows = (await conn.execute(sa.select(messages.c.channel, messages.c.kind).where(
            messages.c.template == "reminder"))).all()
    assert sorted(rows) == [("sms", "broadcast")] * 3
    async with delivery(setup) as svc:
        await svc.run_once()
    assert sorted(r.form["To"] for r in twilio_server.sent()) == [
        "+14155550100", "+14155550101", "+14155550102"]
    assert {r.form["Body"] for r in twilio_server.sent()} == {
        "Hi B0, your code is B.", "Hi B1, your code is B.", "Hi B2, your code is B."}
