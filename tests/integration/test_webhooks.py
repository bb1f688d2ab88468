"""Provider webhooks feed the suppression list: Postmark (Basic auth) and SES over SNS
(signatures verified against a certificate this test makes and serves itself)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from delivery_harness import NOW, make_kernel

from segflowd.delivery.webhooks import SnsVerifier, Webhooks
from segflowd.http import Router
from segflowd.schema import suppressions
from segflowd.store import Store

pytestmark = pytest.mark.anyio

CERT_URL = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-test.pem"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses-events"


def make_cert() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = NOW.replace(tzinfo=dt.UTC)  # the kernel's fake clock: validity is checked by it
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM)


KEY, CERT = make_cert()


def sns_sign(msg: dict[str, str], key: rsa.RSAPrivateKey = KEY, version: str = "2") -> dict[
        str, str]:
    fields = (("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
              if msg["Type"] == "Notification" else
              ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"))
    text = "".join(f"{f}\n{msg[f]}\n" for f in fields if f in msg)
    algo = hashes.SHA256() if version == "2" else hashes.SHA1()
    sig = key.sign(text.encode(), padding.PKCS1v15(), algo)
    return {**msg, "SignatureVersion": version, "Signature": base64.b64encode(sig).decode(),
            "SigningCertURL": msg.get("SigningCertURL", CERT_URL)}


def notification(payload: dict[str, object], **extra: str) -> dict[str, str]:
    return {"Type": "Notification", "MessageId": "m-1", "TopicArn": TOPIC,
            "Message": json.dumps(payload), "Timestamp": "2026-01-01T12:00:00.000Z", **extra}


BOUNCE = {"notificationType": "Bounce", "bounce": {
    "bounceType": "Permanent", "bounceSubType": "General",
    "bouncedRecipients": [{"emailAddress": "Gone@Example.org", "diagnosticCode": "550 5.1.1"}]}}


class Env:
    def __init__(self, http: httpx.AsyncClient, store: Store, fetched: list[str]) -> None:
        self.http, self.store, self.fetched = http, store, fetched

    async def suppressed(self) -> list[tuple[str, str, str]]:
        async with self.store.connect() as conn:
            rows = (await conn.execute(sa.select(suppressions).order_by(
                suppressions.c.address))).mappings().all()
        return [(r["address"], r["reason"], r["source"]) for r in rows]


@pytest.fixture
async def env(store: Store, tmp_path: Path) -> AsyncIterator[Env]:
    setup = make_kernel(store, tmp_path, provider="pm", options=(
        'plugin = "postmark"\nserver_token = "t"\nwebhook_username = "hook"\n'
        'webhook_password = "s3cret"\n'
        f'[providers.ses]\nplugin = "ses"\nregion = "eu-west-1"\nwebhook_topic_arn = "{TOPIC}"\n'))
    fetched: list[str] = []

    async def fetch(url: str) -> bytes:  # stands in for the HTTPS fetch from amazonaws.com
        fetched.append(url)
        return CERT if url.endswith(".pem") else b"<ConfirmSubscriptionResponse/>"

    router = Router()
    Webhooks(setup.kernel, sns=SnsVerifier(fetch)).register_routes(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router),
                                 base_url="http://segflow") as http:
        yield Env(http, store, fetched)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_postmark_hard_bounce_and_spam_complaint_suppress(env: Env) -> None:
    auth = basic("hook", "s3cret")
    r = await env.http.post("/webhooks/postmark", headers=auth, json={
        "RecordType": "Bounce", "Type": "HardBounce", "TypeCode": 1, "Inactive": True,
        "Email": "gone@example.org", "Description": "The server was unable to deliver"})
    assert r.status_code == 200
    assert r.json()["suppressed"] is True
    r = await env.http.post("/webhooks/postmark", headers=auth, json={
        "RecordType": "SpamComplaint", "Type": "SpamComplaint", "Email": "angry@example.org"})
    assert r.status_code == 200
    r = await env.http.post("/webhooks/postmark", headers=auth, json={
        "RecordType": "Bounce", "Type": "SoftBounce", "Inactive": False,
        "Email": "full@example.org"})
    assert r.json()["suppressed"] is False  # a full mailbox is not a reason to stop
    assert await env.suppressed() == [("angry@example.org", "complaint", "postmark"),
                                      ("gone@example.org", "bounce:HardBounce", "postmark")]


async def test_postmark_webhook_with_wrong_credentials_is_refused(env: Env) -> None:
    body = {"RecordType": "Bounce", "Type": "HardBounce", "Email": "x@example.org"}
    for headers in (basic("hook", "guess"), basic("other", "s3cret"), {},
                    {"Authorization": "Bearer s3cret"}):
        r = await env.http.post("/webhooks/postmark", headers=headers, json=body)
        assert r.status_code == 401
    assert await env.suppressed() == []


async def test_ses_signed_bounce_and_complaint_suppress(env: Env) -> None:
    r = await env.http.post("/webhooks/ses", content=json.dumps(sns_sign(notification(BOUNCE))))
    assert r.status_code == 200, r.text
    complaint = {"notificationType": "Complaint", "complaint": {
        "complaintFeedbackType": "abuse",
        "complainedRecipients": [{"emailAddress": "angry@example.org"}]}}
    r = await env.http.post("/webhooks/ses", content=json.dumps(
        sns_sign(notification(complaint, Subject="x"), version="1")))
    assert r.status_code == 200, r.text
    assert await env.suppressed() == [("angry@example.org", "complaint:abuse", "ses"),
                                      ("gone@example.org", "bounce:General 5.1.1", "ses")]
    assert env.fetched == [CERT_URL]  # the certificate is fetched once and cached


async def test_ses_forged_or_tampered_messages_are_refused(env: Env) -> None:
    other_key, _ = make_cert()
    tampered = sns_sign(notification(BOUNCE))
    tampered["Message"] = tampered["Message"].replace("Gone@", "Someone@")
    forged_cases = [
        sns_sign(notification(BOUNCE), key=other_key),  # signed by somebody else
        tampered,  # changed after signing
        sns_sign(notification(BOUNCE, SigningCertURL="https://evil.example.com/c.pem")),
        sns_sign(notification(BOUNCE, SigningCertURL="http://sns.eu-west-1.amazonaws.com/c.pem")),
        sns_sign(notification(BOUNCE, SigningCertURL="https://sns.amazonaws.com.evil.io/c.pem")),
        {**sns_sign(notification(BOUNCE)), "Signature": "not base64!"},
    ]
    for msg in forged_cases:
        r = await env.http.post("/webhooks/ses", content=json.dumps(msg))
        assert r.status_code == 403, msg
    assert await env.suppressed() == []
    assert all(u == CERT_URL for u in env.fetched)  # no other host was ever contacted


async def test_ses_subscription_confirmation_is_confirmed(env: Env) -> None:
    url = ("https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription"
           f"&TopicArn={TOPIC}&Token=abc")
    msg = sns_sign({"Type": "SubscriptionConfirmation", "MessageId": "m-2", "Token": "abc",
                    "TopicArn": TOPIC, "Message": "You have chosen to subscribe",
                    "SubscribeURL": url, "Timestamp": "2026-01-01T12:00:00.000Z"})
    r = await env.http.post("/webhooks/ses", content=json.dumps(msg))
    assert r.status_code == 200
    assert r.json()["confirmed"] is True
    assert env.fetched == [CERT_URL, url]
