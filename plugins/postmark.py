"""The ``postmark`` provider: Postmark's ``/email/batch`` API over httpx.

Options: ``server_token`` (or ``server_token_env``), ``message_stream`` (default
``outbound``), ``broadcast_stream`` (the stream of marketing mail, campaigns' and
broadcasts', which Postmark requires to go apart from transactional mail; default: the
``message_stream``), ``base_url`` (default ``https://api.postmarkapp.com``),
``timeout`` (seconds), ``max_batch`` (at most 500).

Each message in a batch has its own ``ErrorCode``: 0 sent; 406 (inactive recipient)
fails the message and suppresses the address; 100/405/412/429 are transient; any
other code is permanent. HTTP 429 and 5xx answered by Postmark fail the whole call
transiently, as does a connection that could not be made: nothing was sent. What is
about the account, not a message (HTTP 401/403, ErrorCode 10 bad token, 400/401 sender
signature, 405 credits, 412 pending, 100 maintenance, a 5xx, no connection) is a
provider outage: the messages stay queued, no attempt spent.

Whatever leaves the outcome open is *maybe sent* (``unknown``, never re-sent): a timeout
or a lost connection once the request may have gone out, a gateway's 502/504 (its
upstream had the request), and a 200 whose body does not answer the batch (or one of its
messages) in Postmark's documented shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from segflowd.errors import ProviderError
from segflowd.providers import OutgoingMessage, ProviderContext, SendResult

from ._http import GATEWAY_ERRORS, NOT_SENT
from ._options import Options

DEFAULT_BASE_URL = "https://api.postmarkapp.com"
DEFAULT_STREAM = "outbound"
DEFAULT_TIMEOUT = 30.0  # seconds per API call
MAX_BATCH = 500  # Postmark's limit for /email/batch
INACTIVE_RECIPIENT = 406
TRANSIENT_CODES = frozenset({100, 405, 412, 429})  # maintenance, credits, pending, rate
# ErrorCodes about the account or its configuration, never one message: bad server token,
# sender signature missing or unconfirmed, no credits, account pending approval,
# maintenance. A provider outage: the messages stay queued until Postmark answers again.
OUTAGE_CODES = frozenset({10, 100, 400, 401, 405, 412})


class PostmarkProvider:
    """Sends up to 500 messages per API call."""

    def __init__(self, ctx: ProviderContext) -> None:
        o = Options(ctx, "postmark", ("server_token", "message_stream", "broadcast_stream",
                                      "base_url", "timeout", "max_batch"))
        self.token = o.text("server_token", required=True)
        self.stream = o.text("message_stream", DEFAULT_STREAM)
        self.broadcast_stream = o.text("broadcast_stream") or self.stream
        self.base_url = o.text("base_url", DEFAULT_BASE_URL).rstrip("/")
        self.max_batch = o.integer("max_batch", MAX_BATCH)
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise ProviderError(f"[providers.{ctx.name}].max_batch: must be 1..{MAX_BATCH}")
        self._client = httpx.AsyncClient(
            base_url=self.base_url, timeout=o.number("timeout", DEFAULT_TIMEOUT),
            headers={"Accept": "application/json", "X-Postmark-Server-Token": self.token})

    def _payload(self, msg: OutgoingMessage) -> dict[str, object]:
        body: dict[str, object] = {
            "From": msg.sender, "To": msg.to, "Subject": msg.subject,
            "HtmlBody": msg.html, "TextBody": msg.text,
            "MessageStream": self.broadcast_stream if msg.marketing else self.stream,
            "TrackOpens": False, "TrackLinks": "None",  # segflowd tracks, where asked to
            "Headers": [{"Name": n, "Value": v} for n, v in msg.headers],
            "Metadata": {"segflow_message": str(msg.id)},
        }
        if msg.reply_to:
            body["ReplyTo"] = msg.reply_to
        return body

    async def send(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        if not messages:
            return []
        n = len(messages)
        try:
            resp = await self._client.post("/email/batch",
                                           json=[self._payload(m) for m in messages])
        except NOT_SENT as exc:  # no request reached Postmark: it (or the way) is down
            return [SendResult(ok=False, error=f"postmark: {type(exc).__name__}: {exc}",
                               transient=True, outage=True)] * n
        except httpx.HTTPError as exc:  # the request may have reached Postmark
            return [_maybe_sent(f"{type(exc).__name__}: {exc}")] * n
        if resp.status_code in GATEWAY_ERRORS:  # the gateway's upstream had the request
            return [_maybe_sent(f"HTTP {resp.status_code} from a gateway")] * n
        if resp.status_code == 429 or resp.status_code >= 500:  # a 5xx: Postmark is down
            return [SendResult(ok=False, error=f"postmark HTTP {resp.status_code}",
                               transient=True, outage=resp.status_code >= 500)] * n
        if not 200 <= resp.status_code < 300:
            detail = _error_text(resp)
            code = _code(resp)
            return [SendResult(ok=False, error=f"postmark HTTP {resp.status_code}: {detail}",
                               transient=code in TRANSIENT_CODES,
                               outage=resp.status_code in (401, 403) or code in OUTAGE_CODES
                               )] * n
        try:
            answers = resp.json()
        except ValueError:
            answers = None
        if not isinstance(answers, list) or len(answers) != n:
            # Postmark took the batch; what it did with each message cannot be read.
            return [_maybe_sent(f"HTTP {resp.status_code} with an answer that does not "
                                f"match the batch: {resp.text[:200]!r}")] * n
        return [_result(a) for a in answers]

    async def aclose(self) -> None:
        await self._client.aclose()


def _result(answer: object) -> SendResult:
    code = answer.get("ErrorCode") if isinstance(answer, dict) else None
    if not isinstance(answer, dict) or not isinstance(code, int) or isinstance(code, bool):
        return _maybe_sent(f"malformed answer for this message: {str(answer)[:200]!r}")
    if code == 0:
        return SendResult(ok=True, provider_message_id=str(answer.get("MessageID") or ""))
    error = f"postmark {code}: {answer.get('Message', '')}"
    if code == INACTIVE_RECIPIENT:
        return SendResult(ok=False, error=error, suppress=True)
    return SendResult(ok=False, error=error, transient=code in TRANSIENT_CODES,
                      outage=code in OUTAGE_CODES)


def _maybe_sent(why: str) -> SendResult:
    return SendResult(ok=False, error=f"postmark: {why} (may have been sent: not retried)",
                      maybe_sent=True)


def _code(resp: httpx.Response) -> int:
    try:
        return int(resp.json().get("ErrorCode", -1))
    except (ValueError, AttributeError, TypeError):
        return -1


def _error_text(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("Message", resp.text))[:500]
    except (ValueError, AttributeError):
        return resp.text[:500]
