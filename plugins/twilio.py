"""The ``twilio`` SMS provider: Twilio's Programmable Messaging REST API over httpx.

Options: ``account_sid`` (``AC`` and 32 hex digits), ``auth_token`` (or
``auth_token_env`` / ``auth_token_file``: exactly one), the sender: ``from`` (a Twilio
number in E.164, a short code or an alphanumeric sender ID) or ``messaging_service_sid``
(``MG...``; exactly one of the two), ``base_url`` (default ``https://api.twilio.com``;
point it at a fake in tests), ``timeout`` (seconds), ``max_batch``.

Twilio takes one message per ``POST /2010-04-01/Accounts/{sid}/Messages.json``, so a
batch is sent as parallel calls (at most :data:`PARALLEL_CALLS` in flight) over one
kept-alive connection pool, and each message has its own outcome.

Answers: 200/201 with the message's ``sid`` is sent. A Twilio error
(``{"code", "message", "status"}``): 21610 (the recipient texted STOP) fails the message
and suppresses the number; an invalid or unroutable number (21211, 21614, 21408, ...)
and any other 4xx fail the message; 429 and rate codes (20429, 14107, 21611) are
transient: Twilio answered that it refused. What is about the account, not a message
(HTTP 401/403, a 404 for the account, 20003 authentication, 20005 account not active,
a ``from`` or messaging service that is not the account's, a 5xx, no connection) is a
provider outage: the message stays queued, no attempt spent.

Whatever leaves the outcome open is *maybe sent* (``unknown``, never re-sent): a timeout
or a lost connection once the request may have gone out, a gateway's 502/504, and a 2xx
whose body has no message ``sid``.

:func:`twilio_signature` and :func:`signature_valid` check the ``X-Twilio-Signature`` of
the status callbacks Twilio posts back.

Forgetting a user deletes Twilio's copy of each SMS sent to them (its body and numbers):
:meth:`TwilioProvider.forget_sent` (``segflowd.providers.RemoteCopies``) calls ``DELETE
/2010-04-01/Accounts/{sid}/Messages/{MessageSid}.json`` per message. 204 is deleted and
404 already gone; anything else (20009: delivery not complete yet; 401/403, 429, 5xx, no
connection) leaves the message for a later try.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import anyio
import httpx

from segflowd.configenv import resolve_indirections
from segflowd.delivery.pinned import sharded_transport
from segflowd.errors import ConfigError, ProviderError
from segflowd.providers import OutgoingSms, ProviderContext, SendResult
from segflowd.twiliosig import MESSAGE_SID, signature_valid, twilio_signature

from ._http import GATEWAY_ERRORS, NOT_SENT, maybe_sent, send_each
from ._options import Options

__all__ = ["TwilioProvider", "signature_valid", "twilio_signature"]

DEFAULT_BASE_URL = "https://api.twilio.com"
DEFAULT_TIMEOUT = 30.0  # seconds per API call
MAX_BATCH = 50  # messages handed over per send(); Twilio takes one per call
NOT_FOUND = 20404  # Twilio's code of a 404 for a resource it does not have
PARALLEL_CALLS = 10  # Twilio API calls in flight within one send() (and per provider)
ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
UNSUBSCRIBED = 21610  # "Attempt to send to unsubscribed recipient": the number sent STOP
# Twilio refused for now: its API rate (20429), the account's message rate (14107), the
# sender's queue is full (21611), its queue overflowed (30001).
TRANSIENT_CODES = frozenset({20429, 14107, 21611, 30001})
# The account or its configuration, never one message: authentication (20003), the
# account not found / not active / suspended (20404, 20005, 20006, 20008), a `from` that
# is not a valid sender of the account (21212, 21606 is per destination so not here,
# 21659, 21660), a messaging service that does not exist or has no usable sender
# (21701..21705), Twilio's own errors (20500, 20503). The messages stay queued.
OUTAGE_CODES = frozenset({20003, 20404, 20005, 20006, 20008, 21212, 21659, 21660,
                          21701, 21702, 21703, 21704, 21705, 20500, 20503})


class TwilioProvider:
    """One Twilio API call per SMS, a few in parallel over kept-alive connections."""

    def __init__(self, ctx: ProviderContext) -> None:
        ctx = _resolve_token(ctx)
        o = Options(ctx, "twilio", ("account_sid", "auth_token", "from",
                                    "messaging_service_sid", "base_url", "timeout",
                                    "max_batch"))
        self.name = ctx.name
        self.account_sid = o.text("account_sid", required=True)
        if not ACCOUNT_SID.fullmatch(self.account_sid):
            raise ProviderError(f"[providers.{ctx.name}].account_sid: must be a Twilio "
                                "Account SID (AC followed by 32 hex digits), as shown in "
                                "the Twilio console")
        token = o.text("auth_token", required=True)
        self.sender = o.text("from")
        self.messaging_service_sid = o.text("messaging_service_sid")
        if bool(self.sender) == bool(self.messaging_service_sid):
            raise ProviderError(f"[providers.{ctx.name}]: give exactly one of from (the "
                                "sending number or sender ID) and messaging_service_sid")
        self.base_url = o.text("base_url", DEFAULT_BASE_URL).rstrip("/")
        self.max_batch = o.integer("max_batch", MAX_BATCH)
        if not 1 <= self.max_batch <= 1000:
            raise ProviderError(f"[providers.{ctx.name}].max_batch: must be 1..1000")
        timeout = o.number("timeout", DEFAULT_TIMEOUT)
        if timeout <= 0:
            raise ProviderError(f"[providers.{ctx.name}].timeout: must be above 0 seconds")
        self._path = f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        self._message_path = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{{}}.json"
        # The token lives only inside the client's auth (which renders the header);
        # never on self, so no repr, log or error can show it.
        self._client = httpx.AsyncClient(
            base_url=self.base_url, auth=httpx.BasicAuth(self.account_sid, token),
            timeout=timeout, headers={"Accept": "application/json"},
            transport=sharded_transport(httpx.Limits(
                max_connections=PARALLEL_CALLS, max_keepalive_connections=PARALLEL_CALLS)))
        self._limit = anyio.Semaphore(PARALLEL_CALLS)
        # Delivery may hand one message per send() call, this many at once, each marked
        # `sending` just before its call (a crash leaves those in flight `unknown`).
        self.parallel_calls = PARALLEL_CALLS
        # send() starts all its messages at once (up to PARALLEL_CALLS): delivery marks a
        # group of that many `sending` in one commit, all of them in flight together.
        self.concurrent_batch = True

    def __repr__(self) -> str:
        sender = self.sender or self.messaging_service_sid
        return (f"TwilioProvider(name={self.name!r}, account_sid={self.account_sid!r}, "
                f"from={sender!r}, base_url={self.base_url!r})")

    async def send(self, messages: Sequence[OutgoingSms]) -> list[SendResult]:
        """One result per message, in order; the calls run in parallel."""
        return await send_each("twilio", messages, self._send_one, self._limit)

    def _form(self, msg: OutgoingSms) -> dict[str, str]:
        form = {"To": msg.to, "Body": msg.body}
        if self.messaging_service_sid:
            form["MessagingServiceSid"] = self.messaging_service_sid
        else:
            form["From"] = self.sender
        if msg.status_callback:
            form["StatusCallback"] = msg.status_callback
        return form

    async def _send_one(self, msg: OutgoingSms) -> SendResult:
        try:
            resp = await self._client.post(self._path, data=self._form(msg))
        except NOT_SENT as exc:  # no request reached Twilio: it (or the way) is down
            return SendResult(ok=False, error=f"twilio: {type(exc).__name__}: {exc}",
                              transient=True, outage=True)
        except httpx.HTTPError as exc:  # the request may have reached Twilio
            return _maybe_sent(f"{type(exc).__name__}: {exc}")
        if resp.status_code in GATEWAY_ERRORS:  # the gateway's upstream had the request
            return _maybe_sent(f"HTTP {resp.status_code} from a gateway")
        body = _json(resp)
        if 200 <= resp.status_code < 300:
            sid = body.get("sid")
            if not isinstance(sid, str) or not sid:  # Twilio took it; its answer is unreadable
                return _maybe_sent(f"HTTP {resp.status_code} without a message sid: "
                                   f"{resp.text[:200]!r}")
            return SendResult(ok=True, provider_message_id=sid)
        return _refusal(resp.status_code, body, resp.text)

    async def forget_sent(self, sent: Sequence[tuple[int, str]]) -> list[int]:
        """Delete Twilio's copies of ``(row id, message sid)``; the row ids now gone."""
        gone: list[int] = []

        async def one(row: int, sid: str) -> None:
            async with self._limit:
                if await self._delete_one(sid):
                    gone.append(row)

        async with anyio.create_task_group() as tg:
            for row, sid in sent:
                tg.start_soon(one, row, sid)
        return sorted(gone)

    async def _delete_one(self, sid: str) -> bool:
        """True when Twilio has no copy of ``sid`` any more."""
        if not MESSAGE_SID.fullmatch(sid):  # not a Twilio message sid: nothing to delete
            return True
        try:
            resp = await self._client.delete(self._message_path.format(sid))
        except httpx.HTTPError:  # no answer: try again later
            return False
        if resp.status_code == 404:  # gone only if Twilio says so (not a proxy's 404)
            return _json(resp).get("code") == NOT_FOUND
        return 200 <= resp.status_code < 300

    async def aclose(self) -> None:
        await self._client.aclose()


def _refusal(status: int, body: Mapping[str, object], text: str) -> SendResult:
    """What an answered refusal means: Twilio's ``code`` first, then the HTTP status.

    As in the postmark and ses plugins, a 5xx that Twilio itself answered (not a gateway's
    502/504, handled before) is read as "not taken": Twilio's API validates and queues a
    message before it answers 201, and an error answer means no message resource was
    created. It is a transient provider outage: the message stays queued, no attempt spent,
    and delivery probes Twilio until it answers again.
    """
    raw = body.get("code")
    code = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
    message = str(body.get("message") or text[:300])
    error = f"twilio HTTP {status}" + (f" {code}" if code is not None else "") + f": {message}"
    if code == UNSUBSCRIBED:
        return SendResult(ok=False, error=error, suppress=True)
    outage = status in (401, 403, 404) or status >= 500 or code in OUTAGE_CODES
    transient = status == 429 or status >= 500 or code in TRANSIENT_CODES or outage
    return SendResult(ok=False, error=error, transient=transient, outage=outage)


def _maybe_sent(why: str) -> SendResult:
    return maybe_sent("twilio", why)


def _json(resp: httpx.Response) -> Mapping[str, object]:
    try:
        data = resp.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _resolve_token(ctx: ProviderContext) -> ProviderContext:
    """Read ``auth_token_env`` / ``auth_token_file`` when the caller has not (the config
    loader resolves them before a plugin is built; a plugin built by hand gets the same
    rules and errors, which name the key and never the value)."""
    keys = ("auth_token", "auth_token_env", "auth_token_file")
    given = {k: v for k, v in ctx.options.items() if k in keys}
    if set(given) <= {"auth_token"}:
        return ctx

    def error(key: str, why: str) -> ConfigError:
        return ConfigError(f"{key}: {why}")

    try:
        resolved = resolve_indirections(given, f"[providers.{ctx.name}]", os.environ,
                                        ctx.base_dir, error)
    except ConfigError as exc:
        raise ProviderError(str(exc)) from None
    rest = {k: v for k, v in ctx.options.items() if k not in keys}
    return ProviderContext(ctx.name, {**rest, **resolved}, ctx.base_dir)
