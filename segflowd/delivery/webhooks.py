"""Provider webhooks that feed the suppression list: bounces and spam complaints.

``POST /webhooks/postmark`` takes Postmark's Bounce and SpamComplaint webhooks, with
HTTP Basic auth (``webhook_username`` / ``webhook_password`` in the ``[providers.X]``
table whose plugin is ``postmark``). ``POST /webhooks/ses`` takes Amazon SNS
notifications of SES bounces and complaints, and only when a table whose plugin is
``ses`` names the SNS topic they come from in ``webhook_topic_arn`` (404 otherwise): any
AWS account can have SNS sign a message, so the topic is what says it is ours. A message
is accepted when it comes from such a topic, its ``Timestamp`` is within
:data:`SNS_MAX_AGE` of the kernel's clock, and its SNS signature verifies against the
certificate at ``SigningCertURL``: an https URL of a ``.pem`` file on a regional SNS host
(``sns.<region>.amazonaws.com``, ``sns.cn-<...>.amazonaws.com.cn``), whose subject is
``sns.amazonaws.com`` or that host, and which is valid at the kernel's clock. A
``SubscriptionConfirmation`` is confirmed by fetching its ``SubscribeURL`` (also on a
regional SNS host). A ``webhook_topic_arn`` that is not an SNS topic ARN, or that is in a
table of another plugin, is a :class:`~segflowd.errors.ConfigError` when the routes are
registered at start.

Only the recipient's fault suppresses: a complaint, or a bounce that says the address is
dead. Postmark: ``HardBounce``, ``BadEmailAddress``, ``ManuallyDeactivated``, or any
other bounce Postmark marked ``Inactive``, but never ``Blocked``, ``DMARCPolicy`` or
``SpamNotification`` (a block of the sender's IP or domain, which Postmark keeps active).
SES: a ``Permanent`` bounce of subtype ``General``, ``NoEmail``, ``Suppressed`` or
``OnAccountSuppressionList`` whose recipient status is not a policy (5.7.x) or
sender-address (5.1.7, 5.1.8) code; a complaint unless its feedback type is ``not-spam``.
A bounce that does not suppress is logged (``webhook.sender_rejected`` when it is about the
sender, ``webhook.bounce_ignored`` otherwise). The stored reason names the bounce type:
``bounce:HardBounce``, ``bounce:General 5.1.1``, ``complaint``, ``complaint:abuse``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from ..clock import utcnow
from ..config import Config
from ..errors import ConfigError
from ..http import HTTPError, Request, Response, Router, json_response
from ..kernel import Kernel
from ..schema import suppressions
from .msgevents import record_postmark, record_ses

__all__ = ["CERT_CACHE", "SNS_MAX_AGE", "Fetch", "SnsVerifier", "Webhooks", "is_sns_url",
           "ses_topics", "suppress"]

log = structlog.get_logger("segflowd.webhooks")

FETCH_TIMEOUT = 10.0  # seconds to fetch an SNS certificate or confirm a subscription
CERT_CACHE = 32  # SNS signing certificates kept (AWS uses a handful; the oldest goes first)
WEBHOOK_BODY_LIMIT = 256 * 1024  # bytes
# An SNS message older than this (by its signed Timestamp) is refused as a replay; one
# this far in the future says the clock is wrong, and is refused too.
SNS_MAX_AGE = 3600.0  # seconds
# Common names an SNS signing certificate may have (besides its own regional host).
SNS_CERT_NAMES = frozenset({"sns.amazonaws.com"})
# Regional SNS hosts only: "sns.s3.amazonaws.com" is an S3 bucket anybody can own.
_SNS_HOST = re.compile(r"sns\.(?:(?!cn-)[a-z]{2}(?:-[a-z]+)+-\d{1,2}\.amazonaws\.com"
                       r"|cn-[a-z]+(?:-[a-z]+)*-\d{1,2}\.amazonaws\.com\.cn)")
_TOPIC_ARN = re.compile(r"arn:aws(?:-[a-z]+)*:sns:[a-z]{2}(?:-[a-z]+)+-\d{1,2}:\d{12}:"
                        r"[A-Za-z0-9_-]{1,256}(?:\.fifo)?")
REASON_MAX = 32  # characters: suppressions.reason's length
# Postmark bounce types after which the address must not be mailed again.
POSTMARK_HARD = frozenset({"HardBounce", "BadEmailAddress", "ManuallyDeactivated"})
# Postmark bounce types about the sender (an IP or domain block, DMARC, a spam filter):
# Postmark keeps the address active, and so do we, whatever else the webhook says.
POSTMARK_SENDER = frozenset({"Blocked", "DMARCPolicy", "SpamNotification"})
# SES subtypes of a Permanent bounce that say the address is dead (UnsupportedAttachment
# is about the message).
SES_HARD = frozenset({"General", "NoEmail", "Suppressed", "OnAccountSuppressionList"})
# Enhanced status codes (subject.detail) of a refusal about the sender or its policy.
SENDER_STATUS = re.compile(r"7\.\d{1,3}|1\.[78]")
_STATUS = re.compile(r"(?<![\d.])[245]\.(\d{1,3}\.\d{1,3})(?![\d.])")

Fetch = Callable[[str], Awaitable[bytes]]


async def _http_fetch(url: str) -> bytes:
    async with httpx.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=False) as client:
        resp = await client.get(url)
        resp.raise_for_status()
        return resp.content


def is_sns_url(url: str) -> bool:
    """An https URL on a regional Amazon SNS host: ``sns.<region>.amazonaws.com``, or
    ``sns.cn-<...>.amazonaws.com.cn`` (China), on the default port, without user info."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme == "https" and port in (None, 443) and parts.username is None
            and parts.password is None and _SNS_HOST.fullmatch(parts.hostname or "") is not None)


def _is_cert_url(url: str) -> bool:
    if not is_sns_url(url):
        return False
    parts = urlsplit(url)
    return parts.path.endswith(".pem") and not parts.query and not parts.fragment


def _utc(when: dt.datetime) -> dt.datetime:
    """``when`` as naive UTC (the kernel's clock is naive UTC)."""
    return when if when.tzinfo is None else when.astimezone(dt.UTC).replace(tzinfo=None)


def ses_topics(config: Config) -> frozenset[str]:
    """The SNS topics ``POST /webhooks/ses`` accepts: each ``webhook_topic_arn`` of a table
    whose plugin is ``ses``; :class:`ConfigError` naming the key for one that is wrong."""
    topics = set()
    for name, table in config.providers.items():
        if "webhook_topic_arn" not in table.options:
            continue
        key, arn = f"providers.{name}.webhook_topic_arn", table.options["webhook_topic_arn"]
        if str(table.options.get("plugin", name)) != "ses":
            raise ConfigError("only a table whose plugin is ses takes webhook_topic_arn",
                              file=str(config.path), key=key)
        if not isinstance(arn, str) or not _TOPIC_ARN.fullmatch(arn):
            raise ConfigError("must be the ARN of the SNS topic SES notifies, like "
                              "arn:aws:sns:eu-west-1:123456789012:ses-events",
                              file=str(config.path), key=key)
        topics.add(arn)
    return frozenset(topics)


_SIGNED_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token",
                                 "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token",
                                "TopicArn", "Type"),
}


class SnsVerifier:
    """Verifies SNS message signatures (versions 1 and 2); certificates are cached by URL
    (at most :data:`CERT_CACHE` of them)."""

    def __init__(self, fetch: Fetch | None = None) -> None:
        self.fetch: Fetch = fetch or _http_fetch
        self._certs: dict[str, x509.Certificate] = {}

    async def verify(self, msg: Mapping[str, Any], *, now: dt.datetime | None = None) -> None:
        """Return if ``msg`` is signed by SNS with a certificate valid at ``now`` and its
        Timestamp is within :data:`SNS_MAX_AGE` of ``now`` (naive UTC; the system clock
        when not given); raise ValueError saying why not otherwise."""
        now = utcnow() if now is None else now
        kind = msg.get("Type")
        fields = _SIGNED_FIELDS.get(str(kind))
        if fields is None:
            raise ValueError(f"unknown SNS message type {kind!r}")
        version = str(msg.get("SignatureVersion", ""))
        if version not in ("1", "2"):
            raise ValueError(f"unsupported SignatureVersion {version!r}")
        cert_url = str(msg.get("SigningCertURL") or msg.get("SigningCertUrl") or "")
        if not _is_cert_url(cert_url):
            raise ValueError("SigningCertURL is not the https URL of a .pem file on a "
                             "regional SNS host (sns.<region>.amazonaws.com)")
        try:
            signature = base64.b64decode(str(msg.get("Signature", "")), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("Signature is not base64") from None
        text = "".join(f"{f}\n{msg[f]}\n" for f in fields if f in msg and msg[f] is not None)
        cert = self._certs.get(cert_url)
        if cert is None:
            try:
                cert = x509.load_pem_x509_certificate(await self.fetch(cert_url))
            except Exception as exc:
                raise ValueError(f"cannot load the signing certificate: {exc}") from None
            names = {str(a.value).lower()
                     for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
            if not names & {*SNS_CERT_NAMES, str(urlsplit(cert_url).hostname)}:
                raise ValueError("the signing certificate is not issued to SNS")
            while len(self._certs) >= CERT_CACHE:
                del self._certs[next(iter(self._certs))]
            self._certs[cert_url] = cert
        at = now.replace(tzinfo=dt.UTC)
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise ValueError("the signing certificate is not valid now")
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("the signing certificate does not hold an RSA key")
        algo = hashes.SHA1() if version == "1" else hashes.SHA256()  # SNS v1 is SHA1
        try:
            key.verify(signature, text.encode(), padding.PKCS1v15(), algo)
        except InvalidSignature:
            raise ValueError("the SNS signature does not verify") from None
        try:  # signed, so SNS's own: a stale one is a replay
            sent = _utc(dt.datetime.fromisoformat(str(msg.get("Timestamp", ""))))
        except (ValueError, OverflowError):
            raise ValueError("Timestamp is not an ISO 8601 time") from None
        if abs((now - sent).total_seconds()) > SNS_MAX_AGE:
            raise ValueError(f"Timestamp {msg['Timestamp']} is more than "
                             f"{SNS_MAX_AGE:.0f} s from now")


async def suppress(k: Kernel, address: str, reason: str, source: str, detail: str) -> bool:
    """Add ``address`` to the suppression list (once); True if it was new."""
    addr = address.strip().lower()
    if not addr or "@" not in addr:
        return False
    reason = reason[:REASON_MAX]
    now: dt.datetime = k.clock.now()
    async with k.store.begin() as conn:
        done = await conn.execute(k.store.insert_ignore(suppressions).values(
            address=addr, reason=reason, source=source, detail=detail[:1000], created_at=now))
    new = bool(done.rowcount)
    if new:
        log.info("address.suppressed", address=addr, reason=reason, source=source)
        # The label is the kind alone (bounce, complaint): bounded whatever the types.
        k.metrics.inc("segflow_suppressions_total", reason=reason.split(":", 1)[0])
        k.bus.publish("address.suppressed", address=addr, reason=reason, source=source)
    return new


class Webhooks:
    """The ``/webhooks/{postmark,ses}`` routes."""

    def __init__(self, k: Kernel, *, sns: SnsVerifier | None = None) -> None:
        self.k = k
        self.sns = sns or SnsVerifier()
        self.topics = ses_topics(k.config)  # a wrong webhook_topic_arn fails the start

    def register_routes(self, router: Router) -> None:
        router.add("POST", "/webhooks/postmark", self.postmark)
        router.add("POST", "/webhooks/ses", self.ses)

    def _table(self, plugin: str) -> Mapping[str, object] | None:
        for name, table in self.k.config.providers.items():
            if str(table.options.get("plugin", name)) == plugin:
                return table.options
        return None

    async def postmark(self, request: Request) -> Response:
        opts = self._table("postmark") or {}
        user, password = str(opts.get("webhook_username", "")), str(
            opts.get("webhook_password", ""))
        if not user or not password:
            raise HTTPError(404, "not_found", "no postmark provider with webhook_username and "
                                              "webhook_password is configured")
        if not _basic_ok(request.headers.get("authorization", ""), user, password):
            raise HTTPError(401, "unauthorized", "webhook credentials do not match",
                            {"WWW-Authenticate": 'Basic realm="segflow"'})
        body = await request.json(WEBHOOK_BODY_LIMIT)
        if not isinstance(body, dict):
            raise HTTPError(400, "invalid_payload", "expected a JSON object")
        await record_postmark(self.k, body)  # delivered / bounced / complained, for reports
        record = str(body.get("RecordType", ""))
        address = str(body.get("Email", ""))
        added = False
        if record == "SpamComplaint":
            added = await suppress(self.k, address, "complaint", "postmark",
                                   str(body.get("Description", "spam complaint")))
        elif record == "Bounce":
            kind = str(body.get("Type", ""))
            detail = f"{kind}: {body.get('Description', '')}"
            if kind in POSTMARK_HARD or (body.get("Inactive") is True
                                         and kind not in POSTMARK_SENDER):
                added = await suppress(self.k, address, f"bounce:{kind}" if kind else "bounce",
                                       "postmark", detail)
            else:
                _kept("postmark", address, kind, detail, sender=kind in POSTMARK_SENDER)
        return json_response({"ok": True, "suppressed": added})

    async def ses(self, request: Request) -> Response:
        if not self.topics:
            log.warning("webhook.refused", provider="ses", reason="no webhook_topic_arn")
            raise HTTPError(404, "not_found", "no provider table with plugin ses and "
                                              "webhook_topic_arn is configured")
        raw = await request.body(WEBHOOK_BODY_LIMIT)
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError):
            raise HTTPError(400, "invalid_json", "expected an SNS JSON message") from None
        if not isinstance(msg, dict):
            raise HTTPError(400, "invalid_payload", "expected an SNS JSON message")
        try:
            topic = msg.get("TopicArn")  # checked before any certificate is fetched
            if not isinstance(topic, str) or topic not in self.topics:
                raise ValueError("it comes from an unexpected topic")
            await self.sns.verify(msg, now=self.k.clock.now())
        except ValueError as exc:
            log.warning("webhook.refused", provider="ses", reason=str(exc))
            raise HTTPError(403, "forbidden", f"SNS message refused: {exc}") from None
        kind = msg["Type"]
        if kind == "SubscriptionConfirmation":
            url = str(msg.get("SubscribeURL", ""))
            if not is_sns_url(url):
                raise HTTPError(400, "invalid_payload", "SubscribeURL is not an SNS URL")
            try:
                await self.sns.fetch(url)
            except Exception as exc:
                raise HTTPError(502, "confirm_failed",
                                f"confirming the subscription failed: {exc}") from None
            log.info("webhook.subscribed", provider="ses", topic=msg.get("TopicArn"))
            return json_response({"ok": True, "confirmed": True})
        if kind != "Notification":
            return json_response({"ok": True})
        try:
            note = json.loads(str(msg.get("Message", "")))
        except ValueError:
            raise HTTPError(400, "invalid_payload", "Message is not SES JSON") from None
        await record_ses(self.k, note)  # delivered / bounced / complained, for reports
        count = 0
        what = note.get("notificationType") or note.get("eventType") if isinstance(
            note, dict) else None
        if what == "Bounce" and isinstance(note.get("bounce"), dict):
            b = note["bounce"]
            for r in b.get("bouncedRecipients") or []:
                if isinstance(r, dict):
                    count += await self._ses_bounce(b, r)
        elif what == "Complaint" and isinstance(note.get("complaint"), dict):
            c = note["complaint"]
            feedback = str(c.get("complaintFeedbackType") or "")
            if feedback == "not-spam":  # the recipient says it is *not* spam
                return json_response({"ok": True, "suppressed": 0})
            for r in c.get("complainedRecipients") or []:
                if isinstance(r, dict):
                    count += await suppress(
                        self.k, str(r.get("emailAddress", "")),
                        f"complaint:{feedback}" if feedback else "complaint", "ses",
                        feedback or "complaint")
        return json_response({"ok": True, "suppressed": count})

    async def _ses_bounce(self, b: Mapping[str, Any], r: Mapping[str, Any]) -> bool:
        """Suppress one bounced recipient if the bounce is its fault; log it if not."""
        bounce_type, subtype = str(b.get("bounceType", "")), str(b.get("bounceSubType", ""))
        diagnostic = str(r.get("diagnosticCode") or "")
        found = _STATUS.search(str(r.get("status") or "")) or _STATUS.search(diagnostic)
        status = found.group(0) if found else None
        sender = found is not None and SENDER_STATUS.fullmatch(found.group(1)) is not None
        address = str(r.get("emailAddress", ""))
        detail = f"{bounce_type}/{subtype}: {diagnostic}"
        if bounce_type != "Permanent" or subtype not in SES_HARD or sender:
            _kept("ses", address, f"{bounce_type}/{subtype}", detail,
                  sender=sender or subtype == "UnsupportedAttachment")
            return False
        reason = f"bounce:{subtype}"
        if status and len(reason) + 1 + len(status) <= REASON_MAX:
            reason += f" {status}"
        return await suppress(self.k, address, reason, "ses", detail)


def _kept(provider: str, address: str, kind: str, detail: str, *, sender: bool) -> None:
    """Log a bounce that leaves the address active: as a provider-health problem when it
    is about the sender (a block, a policy), as information otherwise."""
    if sender:
        log.warning("webhook.sender_rejected", provider=provider, type=kind,
                    address=address.strip().lower(), detail=detail[:200])
    else:
        log.info("webhook.bounce_ignored", provider=provider, type=kind,
                 address=address.strip().lower(), detail=detail[:200])


def _basic_ok(header: str, user: str, password: str) -> bool:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, f"{user}:{password}".encode())
