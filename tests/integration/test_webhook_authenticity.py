"""What makes an SNS message on ``POST /webhooks/ses`` ours: a pinned topic (any AWS
account can have SNS sign a message), a certificate on a regional SNS host (never an S3
bucket called ``sns``) whose subject is SNS and which is valid now, and a fresh
``Timestamp``. Through the real route, with the kernel's fake clock; the certificate
fetch is the same seam as test_webhooks.py (``SnsVerifier(fetch)``), answering with
certificates this test makes."""

from __future__ import annotations

import base64
import dataclasses
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
from delivery_harness import NOW, Setup, make_kernel

from segflowd.delivery.service import DeliveryService
from segflowd.delivery.webhooks import SNS_MAX_AGE, SnsVerifier, Webhooks
from segflowd.errors import ConfigError
from segflowd.http import Router
from segflowd.schema import suppressions
from segflowd.store import Store

pytestmark = pytest.mark.anyio

TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses-events"
OTHER_TOPIC = "arn:aws:sns:eu-west-1:999999999999:someone-elses-topic"
CERT_URL = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-abc.pem"
SES_TABLE = f'plugin = "ses"\nregion = "eu-west-1"\nwebhook_topic_arn = "{TOPIC}"\n'
BOUNCE = {"notificationType": "Bounce", "bounce": {
    "bounceType": "Permanent", "bounceSubType": "General",
    "bouncedRecipients": [{"emailAddress": "victim@example.org", "status": "5.1.1"}]}}


@dataclasses.dataclass
class Cert:
    key: rsa.RSAPrivateKey
    pem: bytes


def make_cert(cn: str = "sns.amazonaws.com", *, start: dt.datetime = NOW - dt.timedelta(days=1),
              days: float = 30) -> Cert:
    """A self-signed RSA certificate for ``cn``, valid from ``start`` for ``days``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    begin = start.replace(tzinfo=dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(begin).not_valid_after(begin + dt.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    return Cert(key, cert.public_bytes(serialization.Encoding.PEM))


GOOD = make_cert()


def iso(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def signed(msg: dict[str, str], cert: Cert = GOOD, cert_url: str = CERT_URL) -> str:
    """``msg`` as SNS sends it: signed (version 2) over SNS's canonical string."""
    fields = (("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
              if msg["Type"] == "Notification" else
              ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"))
    text = "".join(f"{f}\n{msg[f]}\n" for f in fields if f in msg)
    sig = cert.key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())
    return json.dumps({**msg, "SignatureVersion": "2", "SigningCertURL": cert_url,
                       "Signature": base64.b64encode(sig).decode()})


def bounce(*, topic: str = TOPIC, at: dt.datetime = NOW) -> dict[str, str]:
    return {"Type": "Notification", "MessageId": "m-1", "TopicArn": topic,
            "Message": json.dumps(BOUNCE), "Timestamp": iso(at)}


class Env:
    """The ``/webhooks/ses`` route over a real store; ``certs`` is what each URL serves."""

    def __init__(self, setup: Setup, store: Store, http: httpx.AsyncClient,
                 certs: dict[str, bytes], fetched: list[str]) -> None:
        self.setup, self.store, self.http = setup, store, http
        self.certs, self.fetched = certs, fetched

    async def post(self, body: str) -> httpx.Response:
        return await self.http.post("/webhooks/ses", content=body)

    async def suppressed(self) -> list[str]:
        async with self.store.connect() as conn:
            return list((await conn.execute(sa.select(suppressions.c.address))).scalars())


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Store]:
    """SQLite only: what is checked here happens before the store is written."""
    s = Store.open(sqlite_url)
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


async def open_env(store: Store, base: Path, provider: str, options: str) -> Env:
    setup = make_kernel(store, base, provider=provider, options=options)
    certs: dict[str, bytes] = {CERT_URL: GOOD.pem}
    fetched: list[str] = []

    async def fetch(url: str) -> bytes:  # stands in for the HTTPS fetch from AWS
        fetched.append(url)
        return certs.get(url, b"<ConfirmSubscriptionResponse/>")

    router = Router()
    Webhooks(setup.kernel, sns=SnsVerifier(fetch)).register_routes(router)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://s")
    return Env(setup, store, http, certs, fetched)


@pytest.fixture
async def env(store: Store, tmp_path: Path) -> AsyncIterator[Env]:
    """An ``ses`` provider table that pins the topic."""
    e = await open_env(store, tmp_path, "ses", SES_TABLE)
    async with e.http:
        yield e


async def test_a_genuine_fresh_message_from_the_pinned_topic_suppresses(env: Env) -> None:
    """The control: everything below differs from this message in one respect."""
    r = await env.post(signed(bounce()))
    assert r.status_code == 200, r.text
    assert await env.suppressed() == ["victim@example.org"]
    assert env.fetched == [CERT_URL]


@pytest.mark.parametrize("options", [
    'plugin = "postmark"\nserver_token = "t"\n',  # no ses table at all
    'plugin = "ses"\nregion = "eu-west-1"\n',  # an ses table that pins no topic
])
async def test_without_a_topic_arn_the_ses_webhook_is_off(
        store: Store, tmp_path: Path, options: str) -> None:
    """Any AWS account can have SNS sign messages: unpinned, nothing is accepted, not
    even a subscription confirmation (which would subscribe us to a stranger's topic)."""
    e = await open_env(store, tmp_path, "p", options)
    sub_url = ("https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&Token=t"
               f"&TopicArn={OTHER_TOPIC}")
    async with e.http:
        for body in (signed(bounce(topic=OTHER_TOPIC)), signed({
                "Type": "SubscriptionConfirmation", "MessageId": "m-2", "Token": "t",
                "TopicArn": OTHER_TOPIC, "Message": "subscribe?", "SubscribeURL": sub_url,
                "Timestamp": iso(NOW)})):
            r = await e.post(body)
            assert r.status_code == 404, r.text
            assert "webhook_topic_arn" in r.json()["error"]["message"]
    assert await e.suppressed() == []
    assert e.fetched == []  # neither a certificate nor the SubscribeURL


async def test_a_message_from_another_topic_is_refused_before_any_fetch(env: Env) -> None:
    r = await env.post(signed(bounce(topic=OTHER_TOPIC)))
    assert r.status_code == 403
    assert "topic" in r.json()["error"]["message"]
    assert env.fetched == []
    assert await env.suppressed() == []


@pytest.mark.parametrize("cert_url", [
    "https://sns.s3.amazonaws.com/SimpleNotificationService-x.pem",  # an S3 bucket "sns"
    "https://sns.s3.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
    "https://sns.s3-eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
    "https://sns.evil.amazonaws.com/SimpleNotificationService-x.pem",
    "https://sns.eu-west-1.amazonaws.com.cn/SimpleNotificationService-x.pem",  # not a cn- region
    "https://sns.eu-west-1.amazonaws.com/upload?name=x.pem",  # .pem in the query, not the path
])
async def test_a_certificate_url_off_a_regional_sns_host_is_never_fetched(
        env: Env, cert_url: str) -> None:
    """An attacker's own certificate, served where an attacker could put it, names SNS in
    its subject and is valid: only its URL gives it away."""
    forged = make_cert()
    env.certs[cert_url] = forged.pem
    r = await env.post(signed(bounce(), forged, cert_url))
    assert r.status_code == 403
    assert "SigningCertURL" in r.json()["error"]["message"]
    assert env.fetched == []
    assert await env.suppressed() == []


async def test_the_certificate_subject_must_be_sns(env: Env) -> None:
    """A certificate on an SNS URL must be SNS's: ``sns.amazonaws.com`` or the URL's host."""
    other_url = CERT_URL.replace("-abc.pem", "-other.pem")
    env.certs[other_url] = (wrong := make_cert("www.example.com")).pem
    r = await env.post(signed(bounce(), wrong, other_url))
    assert r.status_code == 403
    assert "not issued to SNS" in r.json()["error"]["message"]
    regional_url = "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-cn.pem"
    env.certs[regional_url] = (regional := make_cert("sns.cn-north-1.amazonaws.com.cn")).pem
    r = await env.post(signed(bounce(), regional, regional_url))
    assert r.status_code == 200, r.text
    assert await env.suppressed() == ["victim@example.org"]


@pytest.mark.parametrize("cert", [
    make_cert(start=NOW - dt.timedelta(days=40)),  # expired ten days ago
    make_cert(start=NOW + dt.timedelta(days=1)),  # not valid before tomorrow
], ids=["expired", "not-yet-valid"])
async def test_a_certificate_outside_its_validity_is_refused(env: Env, cert: Cert) -> None:
    env.certs[CERT_URL] = cert.pem
    r = await env.post(signed(bounce(), cert))
    assert r.status_code == 403
    assert "not valid now" in r.json()["error"]["message"]
    assert await env.suppressed() == []


async def test_a_cached_certificate_is_refused_once_it_expires(env: Env) -> None:
    """Validity is checked at each message against the kernel's clock, not at fetch."""
    short = make_cert(days=2)  # valid from a day ago until tomorrow
    env.certs[CERT_URL] = short.pem
    assert (await env.post(signed(bounce(), short))).status_code == 200
    await env.setup.clock.advance(days=2)
    later = NOW + dt.timedelta(days=2)
    r = await env.post(signed(bounce(at=later), short))
    assert r.status_code == 403
    assert "not valid now" in r.json()["error"]["message"]
    assert env.fetched == [CERT_URL]  # the cached certificate, checked again


async def test_a_stale_or_future_timestamp_is_refused(env: Env) -> None:
    """A replayed message is refused an hour after SNS sent it (by the kernel's clock)."""
    message = signed(bounce(at=NOW))
    await env.setup.clock.advance(seconds=SNS_MAX_AGE + 1)
    r = await env.post(message)
    assert r.status_code == 403
    assert "Timestamp" in r.json()["error"]["message"]
    now = NOW + dt.timedelta(seconds=SNS_MAX_AGE + 1)
    ahead = signed(bounce(at=now + dt.timedelta(seconds=2 * SNS_MAX_AGE)))
    garbled = signed({**bounce(), "Timestamp": "yesterday"})
    for body in (ahead, garbled):
        r = await env.post(body)
        assert r.status_code == 403
        assert "Timestamp" in r.json()["error"]["message"]
    assert await env.suppressed() == []
    r = await env.post(signed(bounce(at=now - dt.timedelta(seconds=SNS_MAX_AGE - 60))))
    assert r.status_code == 200, r.text  # 59 minutes old: still accepted


async def test_a_subscribe_url_off_a_regional_sns_host_is_not_fetched(env: Env) -> None:
    url = f"https://sns.s3.amazonaws.com/?Action=ConfirmSubscription&TopicArn={TOPIC}"
    r = await env.post(signed({
        "Type": "SubscriptionConfirmation", "MessageId": "m-2", "Token": "t", "TopicArn": TOPIC,
        "Message": "subscribe?", "SubscribeURL": url, "Timestamp": iso(NOW)}))
    assert r.status_code == 400
    assert env.fetched == [CERT_URL]


@pytest.mark.parametrize(("options", "message"), [
    ('plugin = "ses"\nregion = "eu-west-1"\nwebhook_topic_arn = ""\n', "ARN of the SNS topic"),
    ('plugin = "ses"\nregion = "eu-west-1"\nwebhook_topic_arn = "ses-events"\n',
     "ARN of the SNS topic"),
    ('plugin = "ses"\nregion = "eu-west-1"\nwebhook_topic_arn = 12\n', "ARN of the SNS topic"),
    ('plugin = "postmark"\nserver_token = "t"\nwebhook_topic_arn = "' + TOPIC + '"\n',
     "plugin is ses"),
])
async def test_a_wrong_webhook_topic_arn_fails_the_start_naming_the_key(
        store: Store, tmp_path: Path, options: str, message: str) -> None:
    """The routes are registered at start: a mistake there stops the daemon with a
    config error naming file and key, before any SNS message is taken."""
    setup = make_kernel(store, tmp_path, provider="mail", options=options)
    with pytest.raises(ConfigError) as caught:
        DeliveryService(setup.kernel).register_routes(Router())
    assert caught.value.key == "providers.mail.webhook_topic_arn"
    assert caught.value.file == str(setup.config.path)
    assert message in caught.value.reason
