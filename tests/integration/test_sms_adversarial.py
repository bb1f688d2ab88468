"""Adversarial tests of the SMS channel: races with Twilio's status callbacks, replies
that find no user, a quiet-hours hold computed in a DST overlap, an opt-out that a
START cannot undo, and the lanes keeping to their own channel.

Each test failed on the first version of the channel (an adversarial review) or pins a
guarantee that held then and must keep holding."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from delivery_harness import NOW, add_user, message_row
from test_sms_delivery import (
    PUBLIC,
    close,
    delivery,
    post_form,
    queue_sms,
    routes,
    sign,
    sms_setup,
)
from twilio_fake import Answer, FakeTwilio, twilio_error
from twilio_fake import twilio_server as twilio_server

from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.http import Router
from segflowd.migrations import m0009_message_channels as m0009
from segflowd.schema import messages, suppressions
from segflowd.sources.audiences import _apply_batch
from segflowd.store import Store

WAIT_FOR_REQUEST = 30.0  # seconds a test waits for the fake to receive a request
FIXED_SID = "SM" + "ab" * 16
NY = "+14155550110"


async def _stop(router: Router, number: str, body: str = "STOP") -> None:
    """The reply ``body`` from ``number``, signed as Twilio signs it."""
    form = {"From": number, "To": "+15005550006", "Body": body}
    reply = await post_form(router, "/webhooks/sms/inbound", form)
    assert reply.status_code == 200


# -- opt-out and replies ----------------------------------------------------------------


@pytest.mark.anyio
async def test_start_after_a_twilio_opt_out_lets_sms_through_again(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    await add_user(store, "ann", None, name="Ann", phone=NY)
    router = routes(setup)
    # The user texts STOP: Twilio's own opt-out blocks the number, and the daemon's
    # subscription goes off. A transactional SMS is still tried and Twilio refuses it.
    await _stop(router, NY)
    twilio_server.fail_next(twilio_error(400, 21610,
                                         "Attempt to send to unsubscribed recipient"))
    first = await queue_sms(setup, "ann", "otp", kind="transaction", key="t1", code="1")
    async with delivery(setup) as svc:
        await svc.run_once()
    assert (await message_row(store, first))["status"] == "failed"
    # START: Twilio lifts its block, and the user expects their codes again.
    await _stop(router, NY, "START")
    again = await queue_sms(setup, "ann", "otp", kind="transaction", key="t2", code="2")
    async with delivery(setup) as svc:
        await svc.run_once()
    assert (await message_row(store, again))["status"] == "sent"


@pytest.mark.anyio
async def test_stop_reaches_a_user_whose_phone_came_from_an_audience(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    async with store.begin() as conn:
        await _apply_batch(store, conn, "crm", {
            "bea": {"profile_id": "bea", "name": "Bea", "phone": "+1 (415) 555-0104"}},
            NOW, None)
    await _stop(routes(setup), "+14155550104")
    mid = await queue_sms(setup, "bea", "reminder", key="m1", code="1")
    async with delivery(setup) as svc:
        await svc.run_once()
    # Delivery itself normalises the number and would text +14155550104 again.
    assert (await message_row(store, mid))["status"] == "suppressed"


@pytest.mark.anyio
async def test_stop_reaches_a_user_whose_stored_phone_is_not_e164(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    await add_user(store, "cy", None, name="Cy", phone="+1 415-555-0105")  # as v8 kept it
    async with store.begin() as conn:  # what the upgrade to version 9 does
        await conn.run_sync(m0009._normalise_phones)
    await _stop(routes(setup), "+14155550105")
    mid = await queue_sms(setup, "cy", "reminder", key="m1", code="1")
    async with delivery(setup) as svc:
        await svc.run_once()
    assert (await message_row(store, mid))["status"] == "suppressed"


@pytest.mark.anyio
async def test_stop_for_a_shared_number_stops_every_user_and_start_restarts_them(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    await add_user(store, "dad", None, name="Dad", phone=NY)
    await add_user(store, "kid", None, name="Kid", phone=NY)
    router = routes(setup)
    await _stop(router, NY, "  stop\n")
    a = await queue_sms(setup, "dad", "reminder", key="m1", code="1")
    b = await queue_sms(setup, "kid", "reminder", key="m2", code="1")
    async with delivery(setup) as svc:
        await svc.run_once()
    assert (await message_row(store, a))["status"] == "suppressed"
    assert (await message_row(store, b))["status"] == "suppressed"
    assert twilio_server.sent() == []
    await _stop(router, NY, "start")
    c = await queue_sms(setup, "kid", "reminder", key="m3", code="1")
    async with delivery(setup) as svc:
        await svc.run_once()
    assert (await message_row(store, c))["status"] == "sent"


@pytest.mark.anyio
async def test_help_reply_is_escaped_twiml(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    reply = await post_form(routes(setup), "/webhooks/sms/inbound",
                            {"From": NY, "To": "+15005550006", "Body": "help"})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/xml")
    assert "<Message>Example Co: reply STOP to stop.</Message>" in reply.text


# -- status callbacks -------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_failure_report_during_the_send_is_not_lost(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    await add_user(store, "eve", None, name="Eve", phone=NY)
    mid = await queue_sms(setup, "eve", "otp", kind="transaction", key="t1", code="1")
    # Twilio creates the message and reports its failure before the API answer gets back.
    twilio_server.fail_next(Answer(201, {"sid": FIXED_SID, "status": "queued"},
                                   delay=WAIT_FOR_REQUEST))
    router = routes(setup)
    svc = DeliveryService(setup.kernel)
    matched: list[bool] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.run_once)
        with anyio.fail_after(WAIT_FOR_REQUEST):
            while not twilio_server.requests:  # noqa: ASYNC110 - a thread's list, no event
                await anyio.sleep(0.01)
        callback = twilio_server.requests[0].form["StatusCallback"]
        assert callback.startswith(PUBLIC)
        report = await post_form(router, callback.removeprefix(PUBLIC), {
            "MessageSid": FIXED_SID, "MessageStatus": "failed", "ErrorCode": "30007"})
        assert report.status_code == 200
        matched.append(bool(report.json()["matched"]))
        twilio_server.released.set()  # now the API answers 201
    await close(svc)
    row = await message_row(store, mid)
    assert row["provider_message_id"] == FIXED_SID
    assert row["status"] == "failed", (row["status"], matched)


async def _sent_one(store: Store, tmp_path: Path, twilio_server: FakeTwilio
                    ) -> tuple[Router, int, str]:
    setup = sms_setup(store, tmp_path, twilio_server)
    await add_user(store, "fay", None, name="Fay", phone=NY)
    mid = await queue_sms(setup, "fay", "otp", kind="transaction", key="t1", code="1")
    async with delivery(setup) as svc:
        await svc.run_once()
    [req] = twilio_server.sent()
    return routes(setup), mid, req.sid


@pytest.mark.anyio
async def test_a_late_sent_report_does_not_undo_delivered(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    router, mid, sid = await _sent_one(store, tmp_path, twilio_server)
    for state in ("delivered", "sent"):
        reply = await post_form(router, "/webhooks/sms/status",
                                {"MessageSid": sid, "MessageStatus": state})
        assert reply.status_code == 200
    assert (await message_row(store, mid))["response"]["delivery"] == "delivered"


@pytest.mark.anyio
async def test_a_late_report_keeps_the_failure_details(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    router, mid, sid = await _sent_one(store, tmp_path, twilio_server)
    await post_form(router, "/webhooks/sms/status", {
        "MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "30003"})
    await post_form(router, "/webhooks/sms/status", {"MessageSid": sid,
                                                     "MessageStatus": "sent"})
    row = await message_row(store, mid)
    assert row["status"] == "failed"
    assert row["response"]["delivery"] == "undelivered"
    assert row["response"].get("error_code") == "30003"


@pytest.mark.anyio
async def test_a_forged_or_foreign_report_changes_nothing(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    router, mid, sid = await _sent_one(store, tmp_path, twilio_server)
    form = {"MessageSid": sid, "MessageStatus": "failed"}
    # Signed for another URL (the inbound route), or with a field added after signing.
    moved = await post_form(router, "/webhooks/sms/status", form, signature=sign(
        "https://mail.example.com/webhooks/sms/inbound", form))
    assert moved.status_code == 403
    # An email row with the same provider id is never touched by an SMS report.
    async with store.begin() as conn:
        other = await enqueue(conn, kind="transaction", template="receipt", now=NOW,
                              user_id="fay", dedupe_key="e1")
        await conn.execute(sa.update(messages).where(messages.c.id == other).values(
            status="sent", provider_message_id=sid, provider="sms"))
    ok = await post_form(router, "/webhooks/sms/status", form)
    assert ok.status_code == 200
    assert (await message_row(store, mid))["status"] == "failed"
    assert (await message_row(store, int(other or 0)))["status"] == "sent"


# -- quiet hours ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_hold_in_the_repeated_hour_of_a_dst_fall_back_is_in_the_future(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server, quiet="21:00-01:30")
    # 2026-11-01 06:15 UTC is 01:15 EST in New York, after the clocks went back at 02:00
    # EDT: the second time the wall clock shows 01:15, inside the quiet hours.
    now = dt.datetime(2026, 11, 1, 6, 15)
    setup.clock.set(now)
    await add_user(store, "gus", None, name="Gus", phone=NY)
    mid = await queue_sms(setup, "gus", "reminder", key="m1", code="1")
    async with delivery(setup) as svc:
        assert await svc.run_once() == 1
        row = await message_row(store, mid)
        assert row["status"] == "queued"
        assert row["next_attempt_at"] > now
        assert await svc.run_once() == 0  # not claimed again while held
    assert twilio_server.requests == []


@pytest.mark.anyio
async def test_holds_repeated_across_nights_never_spend_attempts(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server, quiet="22:00-07:00")
    # 23:00 in New York (EST: 04:00 UTC the next day).
    start = dt.datetime.combine(NOW.date() + dt.timedelta(days=1), dt.time(4, 0))
    setup.clock.set(start)
    await add_user(store, "hal", None, name="Hal", phone=NY)
    mid = await queue_sms(setup, "hal", "reminder", key="m1", code="1")
    async with delivery(setup) as svc:
        for _ in range(3):  # each claim inside the hours holds it again
            await svc.run_once()
            row = await message_row(store, mid)
            assert row["status"] == "queued"
            assert row["attempts"] == 0
            assert row["next_attempt_at"] == start + dt.timedelta(hours=8)  # 07:00 EST
        setup.clock.set(start + dt.timedelta(hours=8))
        await svc.run_once()
    row = await message_row(store, mid)
    assert row["status"] == "sent"
    assert row["attempts"] == 1
    assert len(twilio_server.sent()) == 1


@pytest.mark.anyio
async def test_a_hold_ending_in_a_dst_gap_is_still_ahead(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server, quiet="22:00-02:30")
    # 2026-03-08 06:59 UTC is 01:59 EST; 02:30 that night does not exist in New York.
    now = dt.datetime(2026, 3, 8, 6, 59)
    setup.clock.set(now)
    await add_user(store, "ida", None, name="Ida", phone=NY)
    mid = await queue_sms(setup, "ida", "reminder", key="m1", code="1")
    async with delivery(setup) as svc:
        await svc.run_once()
        row = await message_row(store, mid)
        assert row["status"] == "queued"
        assert row["next_attempt_at"] > now
        assert row["attempts"] == 0


# -- lanes, recovery and channels -------------------------------------------------------


@pytest.mark.anyio
async def test_recovery_settles_sms_rows_like_mail_and_no_lane_takes_the_other(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    await add_user(store, "jo", "jo@example.com", name="Jo", phone=NY)
    in_flight = await queue_sms(setup, "jo", "otp", kind="transaction", key="t1", code="1")
    claimed = await queue_sms(setup, "jo", "otp", kind="transaction", key="t2", code="2")
    async with store.begin() as conn:
        await conn.execute(sa.update(messages).where(messages.c.id == in_flight).values(
            status="sending", attempts=1, provider="sms", claim="c1"))
        await conn.execute(sa.update(messages).where(messages.c.id == claimed).values(
            status="claimed", attempts=1, provider="sms", claim="c1"))
    async with delivery(setup) as svc:
        assert await svc.recover() == [in_flight]
        assert (await message_row(store, in_flight))["status"] == "unknown"
        row = await message_row(store, claimed)
        assert (row["status"], row["attempts"]) == ("queued", 0)
        mail_lane, sms_lane = svc.lanes
        assert (mail_lane.channel, sms_lane.channel) == ("email", "sms")
        assert await svc.run_once(mail_lane) == 0  # the mail lane never claims an SMS
        assert await svc.run_once(sms_lane) == 1
    assert (await message_row(store, claimed))["status"] == "sent"
    assert [r.form["Body"] for r in twilio_server.sent()] == ["Code 2"]  # never "Code 1"


@pytest.mark.anyio
async def test_an_sms_opt_out_suppresses_the_number_not_the_users_email(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    await add_user(store, "kim", "kim@example.com", name="Kim", phone=NY)
    twilio_server.fail_next(twilio_error(400, 21610, "unsubscribed recipient"))
    mid = await queue_sms(setup, "kim", "otp", kind="transaction", key="t1", code="1")
    async with delivery(setup) as svc:
        await svc.run_once()
    assert (await message_row(store, mid))["status"] == "failed"
    async with store.connect() as conn:
        keys = list((await conn.execute(sa.select(suppressions.c.address))).scalars())
    assert keys == [NY]


def test_sms_outbox_and_mail_outbox_forget_only_their_own_files(tmp_path: Path) -> None:
    from segflow_plugins.outbox import OutboxProvider
    from segflow_plugins.smsoutbox import SmsOutboxProvider
    from segflowd.providers import ProviderContext

    folder = tmp_path / "shared"
    folder.mkdir()
    mail = OutboxProvider(ProviderContext("mail", {"path": str(folder)}, tmp_path))
    sms = SmsOutboxProvider(ProviderContext("sms", {"path": str(folder)}, tmp_path))
    (folder / "00000007-sms.json").write_text("{}")  # row 7: an SMS
    (folder / "00000008-x.eml").write_text("mail")  # row 8: an email
    assert sms._delete_files({8}) == 0
    assert mail._delete_files({7}) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["00000007-sms.json", "00000008-x.eml"]


# -- the simulation ---------------------------------------------------------------------

SIM_APP = textwrap.dedent("""\
    from segflowd import Segflow

    app = Segflow()
    app.segment("everyone", sql="SELECT id FROM users")


    @app.campaign("remind", segments=["everyone"])
    def remind(ctx, rt):
        yield rt.send_sms("reminder", code="42")


    app.sms_template("reminder", text="Hi {{ user.name }}, code {{ code }}")
    """)


def test_a_campaign_sms_is_sent_in_the_simulation(tmp_path: Path) -> None:
    from segflowd.testing import Simulation

    flows = tmp_path / "flows.py"
    flows.write_text(SIM_APP)
    with Simulation(f"{flows}:app", start="2026-03-01T15:00:00Z") as sim:
        sim.user("ann", name="Ann", phone="+14155550100")
        sim.advance(minutes=5)
        assert [m.template for m in sim.sent("ann")] == ["reminder"]


# -- segflowd check -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_check_accepts_a_twilio_sms_provider(
        tmp_path: Path, twilio_server: FakeTwilio) -> None:
    from segflowd.cli.check import run_check

    store = Store.open(f"sqlite+aiosqlite:///{tmp_path / 'harness.db'}")
    try:
        await store.migrate()
        setup = sms_setup(store, tmp_path, twilio_server)
        problems = await run_check(setup.config, setup.kernel.app, lambda _line: None)
    finally:
        await store.close()
    assert [p for p in problems if "providers.sms" in p] == []
