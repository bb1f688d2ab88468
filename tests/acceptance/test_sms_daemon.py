"""SMS through the running daemon (a process, SQLite) and a Twilio-shaped server on
loopback (tests/twilio_fake.py): a campaign's ``rt.send_sms`` step and an SMS
transaction reach Twilio's Messages API with the E.164 number ingest stored; an invalid
number is shown on the user and never sent; a daemon killed with SIGKILL while Twilio
holds a request never sends that SMS twice, and sends the rest after it restarts."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from daemon_harness import API_SECRET, RunningDaemon, StartDaemon, launch, stop, store_rows
from twilio_fake import ACCOUNT_SID, AUTH_TOKEN, Answer, FakeTwilio, Recorded, running

from segflowd.providers import SMS_ENTRY_POINT_GROUP, available_providers
from segflowd.schema import messages
from segflowd.twiliosig import twilio_signature

pytestmark = pytest.mark.slow

SEND_TIMEOUT = 30.0  # seconds for the daemon to bring an SMS to its final status
HOLD = 60.0  # seconds the fake keeps the in-flight request unanswered (ends at shutdown)
SENDER = "+15005550006"
FINAL = frozenset({"sent", "failed", "suppressed", "unknown"})

APP = """\
from segflowd import Segflow

app = Segflow()
app.segment("signed-up", sql="SELECT user_id AS id FROM events WHERE name = 'signup'")


@app.campaign("remind", segments=["signed-up"])
def remind(ctx, rt):
    yield rt.send_sms("reminder", code="42")


app.sms_template("reminder", text="Hi {{ user.name }}, code {{ code }}")
app.sms_template("otp_sms", text="Your code is {{ event.code }}")
app.transaction("otp", event="otp_requested", template="otp_sms")
"""


def sms_config(base_url: str) -> str:
    """``[sms]`` with a twilio provider pointed at the fake; one SMS per call, so that
    only one is in flight when the daemon is killed."""
    return f"""
[sms]
provider = "sms"
[providers.sms]
plugin = "twilio"
account_sid = "{ACCOUNT_SID}"
auth_token = "{AUTH_TOKEN}"
from = "{SENDER}"
base_url = "{base_url}"
max_batch = 1
timeout = {HOLD * 2}
"""


ENV = {"SEGFLOW_EMAIL_POLL_INTERVAL": "0.2"}


@pytest.fixture
def twilio() -> Iterator[FakeTwilio]:
    """The fake Twilio; skips (fails under ``CI=true``) when the ``twilio`` plugin's entry
    point is not installed (an editable install older than the plugin: ``pip install
    -e .`` again), since the daemon could not start."""
    if "twilio" not in available_providers(SMS_ENTRY_POINT_GROUP):
        message = (f"no 'twilio' plugin in the {SMS_ENTRY_POINT_GROUP} entry points: "
                   "reinstall segflow (pip install -e .)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message}, and CI=true requires it")
        pytest.skip(message)
    with running() as server:
        yield server


def api(d: RunningDaemon) -> httpx.Client:
    return httpx.Client(base_url=d.base_url, timeout=10,
                        headers={"Authorization": f"Bearer {API_SECRET}"})


def sms_rows(store_url: str) -> list[sa.RowMapping]:
    m = messages.c
    return store_rows(store_url, sa.select(m.id, m.user_id, m.template, m.status, m.channel,
                                           m.last_error).where(m.channel == "sms")
                      .order_by(m.id))


def wait_rows(d: RunningDaemon, count: int, *, final: bool = True) -> list[sa.RowMapping]:
    """The store's SMS rows once there are ``count`` (all in a final status, by default);
    fails with the daemon's log when that takes longer than SEND_TIMEOUT."""
    deadline = time.monotonic() + SEND_TIMEOUT
    while True:
        rows = sms_rows(d.store_url)
        if len(rows) >= count and (not final or all(r["status"] in FINAL for r in rows)):
            return rows
        if d.process.poll() is not None or time.monotonic() > deadline:
            log = (d.config_path.parent / "stderr.log").read_text(errors="replace")
            pytest.fail(f"SMS rows not settled: {[dict(r) for r in rows]}\n{log[-3000:]}")
        time.sleep(0.1)


def wait_for(check: Callable[[], bool], what: str, d: RunningDaemon) -> None:
    deadline = time.monotonic() + SEND_TIMEOUT
    while not check():
        if d.process.poll() is not None or time.monotonic() > deadline:
            log = (d.config_path.parent / "stderr.log").read_text(errors="replace")
            pytest.fail(f"{what}\n{log[-3000:]}")
        time.sleep(0.05)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def by_body(sent: list[Recorded]) -> dict[str, Recorded]:
    return {r.form["Body"]: r for r in sent}


def test_campaign_and_transaction_sms_reach_twilio_and_show_on_the_user(
        start_daemon: StartDaemon, twilio: FakeTwilio, tmp_path: Path) -> None:
    d = start_daemon(store_url=f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", app=APP,
                     extra=sms_config(twilio.url), env=ENV)
    with api(d) as client:
        client.put("/v1/users/ann", json={"attributes": {
            "name": "Ann", "phone": "+1 (415) 555-0100"}}).raise_for_status()
        client.put("/v1/users/bob", json={"attributes": {
            "name": "Bob", "phone": "12345"}}).raise_for_status()
        for uid in ("ann", "bob"):
            client.post(f"/v1/users/{uid}/events", json={"name": "signup"}).raise_for_status()
        client.post("/v1/users/ann/events", json={
            "name": "otp_requested", "attributes": {"code": "777"}}).raise_for_status()
        rows = wait_rows(d, 3)
        ann = client.get("/v1/users/ann").json()
        bob = client.get("/v1/users/bob").json()

    sent = by_body(twilio.sent())
    assert set(sent) == {"Hi Ann, code 42", "Your code is 777"}
    assert len(twilio.requests) == 2  # nothing for bob's number, nothing twice
    for r in sent.values():
        assert r.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
        assert r.form["To"] == "+14155550100"
        assert r.form["From"] == SENDER
        assert r.headers["Authorization"] == basic(ACCOUNT_SID, AUTH_TOKEN)
        assert r.form["StatusCallback"].startswith(f"{d.base_url}/webhooks/sms/status?m=")

    assert ann["attributes"]["phone"] == "+14155550100"
    assert ann["phone_error"] is None
    ann_sms = {(m["template"], m["kind"]): m for m in ann["messages"]}
    assert set(ann_sms) == {("reminder", "campaign"), ("otp_sms", "transaction")}
    for m in ann_sms.values():
        assert (m["channel"], m["status"], m["to"]) == ("sms", "sent", "+14155550100")

    assert bob["attributes"]["phone"] == "12345"  # kept as written
    assert isinstance(bob["phone_error"], str)
    assert bob["phone_error"]
    [bob_sms] = bob["messages"]
    assert (bob_sms["template"], bob_sms["channel"], bob_sms["status"]) == (
        "reminder", "sms", "failed")
    assert bob_sms["error"]
    assert sorted((r["user_id"], r["status"]) for r in rows) == [
        ("ann", "sent"), ("ann", "sent"), ("bob", "failed")]

    # Twilio's status callback, signed with the account's token, records the delivery;
    # a forged one is refused and changes nothing.
    reminder = sent["Hi Ann, code 42"]
    url = reminder.form["StatusCallback"]  # the row's id rides in it, signed with it
    form = {"MessageSid": reminder.sid, "MessageStatus": "delivered",
            "AccountSid": ACCOUNT_SID, "To": "+14155550100", "From": SENDER}
    forged = httpx.post(url, data={**form, "MessageStatus": "failed", "ErrorCode": "30003"},
                        headers={"X-Twilio-Signature": twilio_signature("wrong", url, form)})
    assert forged.status_code == 403
    good = httpx.post(url, data=form,
                      headers={"X-Twilio-Signature": twilio_signature(AUTH_TOKEN, url, form)})
    assert good.status_code < 300, good.text
    with api(d) as client:
        after = {m["template"]: m for m in client.get("/v1/users/ann").json()["messages"]}
    assert after["reminder"]["status"] == "sent"
    assert after["reminder"].get("delivery") == "delivered"


def test_sigkill_during_a_send_never_sends_that_sms_twice(
        twilio: FakeTwilio, tmp_path: Path) -> None:
    store_url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    twilio.fail_next(Answer(delay=HOLD))  # the first SMS handed over gets no answer
    started: list[RunningDaemon] = []
    try:
        d = launch(tmp_path / "first", store_url=store_url, app=APP,
                   extra=sms_config(twilio.url), env=ENV, started=started)
        with api(d) as client:
            client.put("/v1/users/ann", json={"attributes": {
                "name": "Ann", "phone": "+1 (415) 555-0100"}}).raise_for_status()
            for code in ("101", "102", "103"):
                client.post("/v1/users/ann/events", json={
                    "name": "otp_requested", "attributes": {"code": code}}
                ).raise_for_status()
        wait_for(lambda: len(twilio.requests) == 1
                 and len(sms_rows(store_url)) == 3
                 and [r["status"] for r in sms_rows(store_url)].count("sending") == 1,
                 "no SMS in flight with all three queued", d)
        [held] = twilio.requests
        assert held.sid == ""  # unanswered
        [in_flight] = [r for r in sms_rows(store_url) if r["status"] == "sending"]
        status, _, _ = stop(d.process, signal.SIGKILL)
        assert status == -signal.SIGKILL
        assert len(twilio.requests) == 1  # the others were never handed over

        again = launch(tmp_path / "second", store_url=store_url, app=APP,
                       extra=sms_config(twilio.url), env=ENV, started=started)
        rows = {r["id"]: r for r in wait_rows(again, 3)}
        assert rows[in_flight["id"]]["status"] == "unknown"
        assert sorted(r["status"] for r in rows.values()) == ["sent", "sent", "unknown"]

        bodies = [r.form["Body"] for r in twilio.requests]
        assert sorted(bodies) == ["Your code is 101", "Your code is 102", "Your code is 103"]
        assert len(twilio.sent()) == 2
        assert held.form["Body"] not in {r.form["Body"] for r in twilio.sent()}
    finally:
        for running_daemon in started:
            if running_daemon.process.poll() is None:
                stop(running_daemon.process)
