"""Adversarial checks of topics and the preference page (issue #20), on both stores: a
message queued (or retried) before an unsubscribe is stopped at send time, forged tokens
and forms get a 4xx and change nothing, a token changes only its own user, the one-click
button says what it does, a page rendered before a deploy adds a topic does not leave it,
and the names and checks that were found wanting: a topic named "sms", "all" not stopping
a topic's SMS, a dead link's form saying "saved", an old link acting for whoever signs up
under a forgotten id, form unsubscribes missing from reports (each failed first)."""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from delivery_harness import NOW, add_user, message_row
from test_preferences import AUTH, FORM, Env
from test_preferences import env as env
from test_sms_delivery import delivery, sms_setup
from twilio_fake import FakeTwilio
from twilio_fake import twilio_server as twilio_server

from segflowd.delivery.outbox import enqueue
from segflowd.errors import AppError
from segflowd.ingest.users import upsert_users
from segflowd.providers import SendResult
from segflowd.schema import message_events, subscriptions
from segflowd.store import Store

pytestmark = pytest.mark.anyio

_INPUT = re.compile(r"<input ([^>]*)>")
_ATTR = re.compile(r'(\w+)="([^"]*)"')


def browser_form(page: str) -> bytes:
    """What a browser posts for the page's first form as it was rendered: its hidden
    fields and its ticked checkboxes."""
    form = page.split("</form>")[0]
    fields = []
    for raw in _INPUT.findall(form):
        attrs = dict(_ATTR.findall(raw))
        if attrs.get("type") == "hidden" or (
                attrs.get("type") == "checkbox" and raw.rstrip().endswith("checked")):
            fields.append(f"{attrs['name']}={attrs['value']}")
    return "&".join(fields).encode()


async def test_a_message_queued_before_the_unsubscribe_is_suppressed_at_send(env: Env) -> None:
    async with env.setup.kernel.store.begin() as conn:
        mid = await enqueue(conn, kind="campaign", template="welcome", now=env.setup.clock.now(),
                            user_id="u1", dedupe_key=None, data={"plan": "pro"},
                            topic="offers")
    assert mid is not None
    r = await env.http.put("/v1/users/u1/subscriptions", headers=AUTH,
                           json={"topics": {"offers": False}})
    assert r.status_code == 200
    await env.svc.run_once()
    assert await env.status(mid) == ("suppressed", "user unsubscribed from topic 'offers'")
    assert env.provider.sent == []


async def test_a_retry_after_the_unsubscribe_is_suppressed(env: Env) -> None:
    env.provider.script = [SendResult(ok=False, error="429", transient=True)]
    mid = await env.send(topic="newsletter")
    row = await message_row(env.setup.kernel.store, mid)
    assert row["status"] == "queued"  # to be retried
    path = env.unsubscribe_path()
    r = await env.http.post(path, content=b"List-Unsubscribe=One-Click", headers=FORM)
    assert r.status_code == 200
    env.setup.clock.set(row["next_attempt_at"])
    await env.svc.run_once()
    assert await env.status(mid) == ("suppressed", "user unsubscribed from topic 'newsletter'")
    assert len(env.provider.sent) == 1  # the first, failed try only


@pytest.mark.parametrize("token", [
    "garbage", "a.b", "x" * 5000, "..", "%ff%fe.%00", "eyJtIjoxfQ.AAAA"])
async def test_a_forged_or_garbled_token_is_a_404_and_changes_nothing(
        env: Env, token: str) -> None:
    for method in ("GET", "POST"):
        r = await env.http.request(method, f"/u/{token}", content=b"prefs=1&all=off",
                                   headers=FORM)
        assert r.status_code == 404, (method, r.text)
    assert await env.off() == {}


async def test_a_token_of_another_purpose_is_refused(env: Env) -> None:
    mid = await env.send(topic="offers")
    opened = env.svc.signer.sign("o", {"m": mid})  # ours, but the open pixel's
    for method in ("GET", "POST"):
        r = await env.http.request(method, f"/u/{opened}", content=b"prefs=1&all=off",
                                   headers=FORM)
        assert r.status_code == 404
    assert await env.off() == {}


async def test_a_forged_form_changes_only_app_topics_of_its_own_user(env: Env) -> None:
    await add_user(env.setup.kernel.store, "u2", "bob@example.org", name="Bob")
    await env.send(topic="offers")
    path = env.unsubscribe_path()
    body = ("prefs=1&topic=offers&topic=sms&topic=<script>&all=on&user=u2&u=u2"
            "&topic=" + "z" * 3000).encode()
    r = await env.http.post(path, content=body, headers=FORM)
    assert r.status_code == 200
    assert "<script>" not in r.text
    assert await env.off() == {"newsletter": True, "marketing": True}  # "all" was sent
    assert await env.off("u2") == {}
    too_big = await env.http.post(path, content=b"prefs=1&" + b"a" * 20_000, headers=FORM)
    assert too_big.status_code == 413
    bad = await env.http.post(path, content=b"prefs=1&\xff\xfe=\x00&topic=%ff", headers=FORM)
    assert bad.status_code == 200  # undecodable bytes are only unticked boxes


async def test_resubscribing_from_the_page_sends_again(env: Env) -> None:
    await env.send(topic="offers")
    path = env.unsubscribe_path()
    await env.http.post(path, content=b"List-Unsubscribe=One-Click", headers=FORM)
    assert (await env.status(await env.send(topic="offers")))[0] == "suppressed"
    page = await env.http.get(path)
    body = browser_form(page.text).replace(b"prefs=1", b"prefs=1&topic=offers")
    await env.http.post(path, content=body, headers=FORM)
    assert await env.off() == {"offers": False}
    assert (await env.status(await env.send(topic="offers")))[0] == "sent"


async def test_one_click_and_put_at_once_leave_one_row_per_topic(env: Env) -> None:
    await env.send(topic="offers")
    path = env.unsubscribe_path()
    codes: list[int] = []

    async def click() -> None:
        codes.append((await env.http.post(path, content=b"List-Unsubscribe=One-Click",
                                          headers=FORM)).status_code)

    async def put() -> None:
        codes.append((await env.http.put("/v1/users/u1/subscriptions", headers=AUTH, json={
            "all": False, "topics": {"offers": False, "newsletter": False}})).status_code)

    for _ in range(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(click)
            tg.start_soon(put)
    assert codes == [200] * 10
    async with env.setup.kernel.store.connect() as conn:
        rows = (await conn.execute(sa.select(subscriptions.c.topic).where(
            subscriptions.c.user_id == "u1"))).scalars().all()
    assert sorted(rows) == ["marketing", "newsletter", "offers"]
    assert await env.off() == {"marketing": True, "newsletter": True, "offers": True}


async def test_the_one_click_button_of_a_topic_the_app_no_longer_has_says_what_it_does(
        env: Env) -> None:
    # queued while "retired" was an app topic, sent after a deploy removed it
    await env.send(topic="retired")
    path = env.unsubscribe_path()
    page = await env.http.get(path)
    assert "“retired”" in page.text
    assert "Unsubscribe from all marketing email" not in page.text.split("Or in one click")[1]
    r = await env.http.post(path, content=b"List-Unsubscribe=One-Click", headers=FORM)
    assert "“retired”" in r.text
    assert await env.off() == {"retired": True}  # what the button said: that topic only
    assert (await env.status(await env.send(topic="retired")))[0] == "suppressed"


async def test_a_topic_added_after_the_page_was_shown_is_not_left_by_its_form(
        env: Env) -> None:
    await env.send(topic="offers")
    path = env.unsubscribe_path()
    page = await env.http.get(path)
    env.setup.kernel.app.topic("events", title="Events")  # a deploy, while the page is open
    r = await env.http.post(path, content=browser_form(page.text), headers=FORM)
    assert r.status_code == 200
    assert await env.off() == {}  # every box was ticked: nothing changes
    assert (await env.status(await env.send(topic="events")))[0] == "sent"


async def test_the_page_of_an_address_link_says_its_one_click_leaves_all(env: Env) -> None:
    # A marketing message queued for an address, not a user: its one-click suppresses
    # the address (all mail), whatever the message's topic, so the button must say so.
    async with env.setup.kernel.store.begin() as conn:
        mid = await enqueue(conn, kind="broadcast", template="welcome",
                            now=env.setup.clock.now(), user_id=None, dedupe_key=None,
                            to_address="Eve <eve@example.org>", data={"plan": "pro"},
                            topic="offers")
    assert mid is not None
    # the link prepare signs for it (prepare.BatchPreparer._job)
    path = f"/u/{env.svc.signer.sign('u', {'m': mid, 'a': 'eve@example.org'})}"
    page = await env.http.get(path)
    assert "Save preferences" not in page.text  # no user: no form
    assert "Unsubscribe from all marketing email" in page.text
    assert "“Offers”" not in page.text
    r = await env.http.post(path, content=b"List-Unsubscribe=One-Click", headers=FORM)
    assert "no more marketing email" in r.text


async def test_an_app_topic_named_sms_is_refused(env: Env) -> None:
    # Accepted, an app topic "sms" shares its subscriptions row with STOP: a user who
    # texted STOP shows as unsubscribed from it (and gets none of its email), and one who
    # unticks it on the email page gets no marketing SMS at all.
    with pytest.raises(AppError, match="sms"):
        env.setup.kernel.app.topic("sms", title="Text message news")


async def test_an_sms_of_a_topic_is_suppressed_after_unsubscribe_from_all(
        store: Store, tmp_path: Path, twilio_server: FakeTwilio) -> None:
    setup = sms_setup(store, tmp_path, twilio_server)
    async with store.begin() as conn:
        await upsert_users(store, conn, {"ann": [{"name": "Ann", "phone": "+1 415 555 0100"}]},
                           NOW)
        await conn.execute(sa.insert(subscriptions), [
            {"user_id": "ann", "topic": "marketing", "unsubscribed_at": NOW,
             "updated_at": NOW}])
        mid = await enqueue(conn, kind="campaign", template="otp", now=NOW, user_id="ann",
                            dedupe_key="ann-offers", data={"code": "1"}, channel="sms",
                            topic="offers")
    assert mid is not None
    async with delivery(setup) as svc:
        await svc.run_once()
    row = await message_row(store, mid)
    # leaving "offers" alone stops this SMS (test_sms_topics); leaving all must too
    assert (row["status"], row["last_error"]) == (
        "suppressed", "user unsubscribed from marketing messages")


async def test_the_form_of_a_user_forgotten_since_the_page_says_nothing_was_saved(
        env: Env) -> None:
    await env.send(topic="newsletter")
    path = env.unsubscribe_path()
    page = await env.http.get(path)
    assert (await env.http.delete("/v1/users/u1", headers=AUTH)).status_code == 200
    r = await env.http.post(path, content=browser_form(page.text) + b"&all=off", headers=FORM)
    assert r.status_code < 500
    assert await env.off() == {}
    assert "saved" not in r.text


async def test_an_old_link_does_not_change_whoever_signs_up_under_a_forgotten_id(
        env: Env) -> None:
    await env.send(topic="newsletter")
    path = env.unsubscribe_path()
    assert (await env.http.delete("/v1/users/u1", headers=AUTH)).status_code == 200
    await add_user(env.setup.kernel.store, "u1", "zoe@example.org", name="Zoe")  # new person
    r = await env.http.put("/v1/users/u1/subscriptions", headers=AUTH, json={"all": False})
    assert r.status_code == 200  # Zoe wants no marketing mail
    await env.http.post(path, content=b"prefs=1&topic=newsletter&topic=offers", headers=FORM)
    await env.http.post(path, content=b"List-Unsubscribe=One-Click", headers=FORM)
    # the old link's message is no longer u1's (forget cleared it): nothing changes
    assert await env.off() == {"marketing": True}


async def test_leaving_the_message_topic_with_the_form_counts_in_reports(env: Env) -> None:
    mid = await env.send(topic="newsletter")
    path = env.unsubscribe_path()
    page = await env.http.get(path)
    body = browser_form(page.text).replace(b"&topic=newsletter", b"")
    r = await env.http.post(path, content=body, headers=FORM)
    assert "Your preferences are saved." in r.text
    assert await env.off() == {"newsletter": True}
    async with env.setup.kernel.store.connect() as conn:
        kinds = (await conn.execute(sa.select(message_events.c.kind).where(
            message_events.c.message_id == mid))).scalars().all()
    assert kinds == ["unsubscribed"]
