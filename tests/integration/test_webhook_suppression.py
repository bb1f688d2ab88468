"""Webhooks suppress only for the recipient's fault: Postmark's sender-side bounce types
(Blocked, DMARCPolicy, SpamNotification) and SES's non-recipient bounces are logged, never
suppressed; the stored reason names the bounce type. Through the real HTTP routes."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs
from test_webhooks import Env, basic, notification, sns_sign
from test_webhooks import env as env  # the fixture (a route over a real store)

pytestmark = pytest.mark.anyio

AUTH = basic("hook", "s3cret")


async def postmark(env: Env, **body: object) -> bool:
    r = await env.http.post("/webhooks/postmark", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    return bool(r.json()["suppressed"])


@pytest.mark.parametrize("kind", ["HardBounce", "BadEmailAddress", "ManuallyDeactivated"])
async def test_postmark_recipient_bounces_suppress_with_their_type(env: Env, kind: str) -> None:
    assert await postmark(env, RecordType="Bounce", Type=kind, Email="Gone@Example.org",
                          Description="unknown user")
    assert await env.suppressed() == [("gone@example.org", f"bounce:{kind}", "postmark")]


@pytest.mark.parametrize("kind", ["Blocked", "DMARCPolicy", "SpamNotification"])
async def test_postmark_sender_side_bounces_never_suppress_and_are_logged(
        env: Env, kind: str) -> None:
    with capture_logs() as logs:
        # Inactive too: a sender-side type never suppresses, whatever else the hook says.
        assert not await postmark(env, RecordType="Bounce", Type=kind, Inactive=True,
                                  Email="ann@outlook.example", Description="IP blocked")
    assert await env.suppressed() == []
    [event] = [e for e in logs if e["event"] == "webhook.sender_rejected"]
    assert (event["log_level"], event["provider"], event["type"]) == (
        "warning", "postmark", kind)


async def test_postmark_other_bounces_suppress_only_when_postmark_deactivated(
        env: Env) -> None:
    with capture_logs() as logs:
        assert not await postmark(env, RecordType="Bounce", Type="SoftBounce",
                                  Inactive=False, Email="full@example.org")
        assert not await postmark(env, RecordType="Bounce", Type="Transient",
                                  Email="later@example.org")
    assert [e["type"] for e in logs if e["event"] == "webhook.bounce_ignored"] == [
        "SoftBounce", "Transient"]
    assert await postmark(env, RecordType="Bounce", Type="SoftBounce", Inactive=True,
                          Email="dead@example.org")
    assert await postmark(env, RecordType="SpamComplaint", Type="SpamComplaint",
                          Email="angry@example.org")
    assert await env.suppressed() == [("angry@example.org", "complaint", "postmark"),
                                      ("dead@example.org", "bounce:SoftBounce", "postmark")]


async def ses(env: Env, payload: dict[str, object]) -> int:
    r = await env.http.post("/webhooks/ses", content=json.dumps(sns_sign(notification(payload))))
    assert r.status_code == 200, r.text
    return int(r.json()["suppressed"])


def bounce(bounce_type: str, subtype: str, *recipients: dict[str, str]) -> dict[str, object]:
    return {"notificationType": "Bounce", "bounce": {
        "bounceType": bounce_type, "bounceSubType": subtype,
        "bouncedRecipients": list(recipients)}}


async def test_ses_permanent_recipient_bounces_suppress_with_subtype_and_status(
        env: Env) -> None:
    assert await ses(env, bounce("Permanent", "NoEmail", {
        "emailAddress": "a@example.org", "status": "5.1.1",
        "diagnosticCode": "smtp; 550 5.1.1 user unknown"})) == 1
    assert await ses(env, bounce("Permanent", "OnAccountSuppressionList", {
        "emailAddress": "b@example.org"})) == 1
    assert await ses(env, bounce("Permanent", "General", {
        "emailAddress": "c@example.org", "diagnosticCode": "smtp; 550 5.2.1 disabled"})) == 1
    assert await env.suppressed() == [
        ("a@example.org", "bounce:NoEmail 5.1.1", "ses"),
        ("b@example.org", "bounce:OnAccountSuppressionList", "ses"),
        ("c@example.org", "bounce:General 5.2.1", "ses")]


async def test_ses_sender_side_and_passing_bounces_never_suppress(env: Env) -> None:
    with capture_logs() as logs:
        cases = [
            bounce("Permanent", "General", {  # a policy block reported as a hard bounce
                "emailAddress": "a@example.org", "status": "5.7.1",
                "diagnosticCode": "smtp; 550 5.7.1 Service unavailable, client host blocked"}),
            bounce("Permanent", "General", {
                "emailAddress": "b@example.org",
                "diagnosticCode": "smtp; 550 5.7.26 DMARC policy"}),
            bounce("Permanent", "UnsupportedAttachment", {"emailAddress": "c@example.org"}),
            bounce("Transient", "MailboxFull", {"emailAddress": "d@example.org"}),
            bounce("Undetermined", "Undetermined", {"emailAddress": "e@example.org"}),
        ]
        for payload in cases:
            assert await ses(env, payload) == 0
    assert await env.suppressed() == []
    sender = [e["address"] for e in logs if e["event"] == "webhook.sender_rejected"]
    ignored = [e["address"] for e in logs if e["event"] == "webhook.bounce_ignored"]
    assert sender == ["a@example.org", "b@example.org", "c@example.org"]
    assert ignored == ["d@example.org", "e@example.org"]


async def test_ses_complaints_suppress_except_not_spam(env: Env) -> None:
    def complaint(address: str, feedback: str | None) -> dict[str, object]:
        body: dict[str, object] = {"complainedRecipients": [{"emailAddress": address}]}
        if feedback is not None:
            body["complaintFeedbackType"] = feedback
        return {"notificationType": "Complaint", "complaint": body}

    assert await ses(env, complaint("a@example.org", "abuse")) == 1
    assert await ses(env, complaint("b@example.org", None)) == 1
    assert await ses(env, complaint("c@example.org", "not-spam")) == 0
    assert await env.suppressed() == [("a@example.org", "complaint:abuse", "ses"),
                                      ("b@example.org", "complaint", "ses")]
