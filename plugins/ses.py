"""The ``ses`` provider: Amazon SES v2 ``SendEmail`` with raw MIME content, over httpx.

Requests are signed with AWS Signature Version 4 by ``httpx-auth``. Options: ``region``
(required: the original's fault was ignoring it), ``access_key_id`` and
``secret_access_key`` (or their ``_env`` forms), ``configuration_set``,
``configuration_set_marketing`` (the configuration set of campaigns' and broadcasts'
mail, to keep its reputation and event destinations apart; default: the
``configuration_set``), ``endpoint_url``
(default ``https://email.<region>.amazonaws.com``; point it at moto in tests),
``timeout`` (seconds), ``concurrency`` is delivery's, ``max_batch``.

Throttling (HTTP 429, ``TooManyRequestsException``, ``LimitExceededException``) and 5xx
answered by SES are transient, as is a connection that could not be made;
``MessageRejected`` and other 4xx answers are permanent. What is about the account, not
the message (HTTP 401/403 such as a rotated key or a bad signature, ``SendingPaused``,
``AccountSuspended``, ``NotFound`` for a mistyped configuration set,
``MailFromDomainNotVerified``, a 5xx, no connection) is a provider outage: the message
stays queued, no attempt spent. Each message has its own outcome: one call's failure
never touches the others of the batch. *Maybe sent* (``unknown``, never re-sent): a timeout or lost
connection once the request may have gone out, a gateway's 502/504, and a 2xx whose body
has no ``MessageId``.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import anyio
import httpx
from httpx_auth import AWS4Auth

from segflowd.providers import OutgoingMessage, ProviderContext, SendResult

from ._http import GATEWAY_ERRORS, NOT_SENT, maybe_sent, send_each
from ._options import Options

DEFAULT_TIMEOUT = 30.0  # seconds per API call
MAX_BATCH = 50  # messages handed over per send(); SES takes one per call, sent in parallel
PARALLEL_CALLS = 10  # SES API calls in flight within one send()
TRANSIENT_TYPES = frozenset({"TooManyRequestsException", "LimitExceededException",
                             "ThrottlingException", "InternalFailure", "ServiceUnavailable"})
# The account or its configuration, never one message: a provider outage (see below).
OUTAGE_TYPES = frozenset({
    "SendingPausedException", "AccountSuspendedException", "NotFoundException",
    "MailFromDomainNotVerifiedException", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "UnrecognizedClientException", "AccessDeniedException", "ExpiredTokenException",
    "InternalFailure", "ServiceUnavailable"})


class SesProvider:
    """One SES v2 API call per message, a few in parallel."""

    def __init__(self, ctx: ProviderContext) -> None:
        o = Options(ctx, "ses", ("region", "access_key_id", "secret_access_key",
                                 "configuration_set", "configuration_set_marketing",
                                 "endpoint_url", "timeout", "max_batch"))
        self.region = o.text("region", required=True)
        self.configuration_set = o.text("configuration_set")
        self.configuration_set_marketing = (o.text("configuration_set_marketing")
                                            or self.configuration_set)
        self.endpoint = o.text("endpoint_url",
                               f"https://email.{self.region}.amazonaws.com").rstrip("/")
        self.max_batch = max(1, o.integer("max_batch", MAX_BATCH))
        auth = AWS4Auth(access_id=o.text("access_key_id", required=True),
                        secret_key=o.text("secret_access_key", required=True),
                        region=self.region, service="ses")
        self._client = httpx.AsyncClient(base_url=self.endpoint, auth=auth,
                                         timeout=o.number("timeout", DEFAULT_TIMEOUT))
        self._limit = anyio.Semaphore(PARALLEL_CALLS)
        # Delivery hands one message per send() call, this many at once, each marked
        # `sending` just before its call (a crash leaves those in flight `unknown`).
        self.parallel_calls = PARALLEL_CALLS

    async def send(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        return await send_each("ses", messages, self._send_one, self._limit)

    async def _send_one(self, msg: OutgoingMessage) -> SendResult:
        body: dict[str, object] = {
            "FromEmailAddress": msg.sender,
            "Destination": {"ToAddresses": [msg.to]},
            "Content": {"Raw": {"Data": base64.b64encode(msg.mime).decode("ascii")}},
        }
        configuration_set = (self.configuration_set_marketing if msg.marketing
                             else self.configuration_set)
        if configuration_set:
            body["ConfigurationSetName"] = configuration_set
        try:
            resp = await self._client.post("/v2/email/outbound-emails", json=body)
        except NOT_SENT as exc:  # no request reached SES: it (or the way) is down
            return SendResult(ok=False, error=f"ses: {type(exc).__name__}: {exc}",
                              transient=True, outage=True)
        except httpx.HTTPError as exc:  # the request may have reached SES
            return _maybe_sent(f"{type(exc).__name__}: {exc}")
        if resp.status_code in GATEWAY_ERRORS:
            return _maybe_sent(f"HTTP {resp.status_code} from a gateway")
        if 200 <= resp.status_code < 300:
            message_id = _json_field(resp, "MessageId")
            if not message_id:  # SES took it, but its answer cannot be read
                return _maybe_sent(f"HTTP {resp.status_code} without a MessageId: "
                                   f"{resp.text[:200]!r}")
            return SendResult(ok=True, provider_message_id=message_id)
        kind = (resp.headers.get("x-amzn-errortype", "").split(":")[0]
                or _json_field(resp, "__type") or _json_field(resp, "code"))
        message = _json_field(resp, "message") or _json_field(resp, "Message") or resp.text[:300]
        error = f"ses HTTP {resp.status_code} {kind}: {message}"
        transient = resp.status_code == 429 or resp.status_code >= 500 or kind in TRANSIENT_TYPES
        outage = resp.status_code in (401, 403) or resp.status_code >= 500 or kind in OUTAGE_TYPES
        return SendResult(ok=False, error=error, transient=transient, outage=outage)

    async def aclose(self) -> None:
        await self._client.aclose()


def _maybe_sent(why: str) -> SendResult:
    return maybe_sent("ses", why)


def _json_field(resp: httpx.Response, key: str) -> str:
    try:
        data = resp.json()
    except ValueError:
        return ""
    return str(data.get(key, "")) if isinstance(data, dict) else ""
