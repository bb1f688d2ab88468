"""The ``smtp`` provider: aiosmtplib over TLS, STARTTLS or plain, with one reused connection.

Options: ``host``, ``port`` (default 587), ``security`` (``starttls`` the default, ``tls``
for implicit TLS on 465, ``none``), ``username``/``password`` (or ``password_env``),
``timeout`` (seconds), ``validate_certs`` (default true), ``max_batch``.

5xx answers are permanent and 4xx answers transient, as are a refused or lost connection
before DATA: nothing was sent. A refused or lost connection, and any answer before MAIL
FROM (a 554 greeting, a 535/530 AUTH) or a 421 at any stage, are about the server or
the account, never the message: a provider outage (the message stays queued, see
``SendResult.outage``).
Only the recipient's fault suppresses the address: a 5xx answer to RCPT TO whose
enhanced status code says the mailbox is bad (5.1.x but for 5.1.7 and 5.1.8, which are
about the sender; 5.2.1), or a 550/551/553 there without an enhanced code. An answer to
MAIL FROM or to DATA, and a 5.7.x or sender-address answer to RCPT TO, is about the
sender: the message fails (or is retried) without suppressing, and a permanent one is logged as
``smtp.sender_rejected`` with the stage and codes (a provider-health problem).
Once DATA began, a timeout or a lost connection leaves the outcome open: the server may
have the whole message, so it is *maybe sent* (``unknown``, never re-sent). An answer
refusing the data is still a refusal (nothing was taken).
"""

from __future__ import annotations

import contextlib
import email.utils
import re
from collections.abc import Sequence
from typing import Any

import aiosmtplib
import anyio
import anyio.lowlevel
import structlog

from segflowd.errors import ProviderError
from segflowd.providers import OutgoingMessage, ProviderContext, SendResult

from ._options import Options

log = structlog.get_logger("segflow_plugins.smtp")

DEFAULT_PORT = 587
DEFAULT_TIMEOUT = 30.0  # seconds per SMTP command
# One message per send() call by default: SMTP hands messages over one at a time, so with
# one per call a crash leaves at most one message per delivery worker `unknown` (a larger
# batch would leave all of it). The connection is kept across calls either way.
MAX_BATCH = 1
PARALLEL_CALLS = 1  # one connection, one message at a time: each marked `sending` alone
ABORT_TURNS = 3  # event-loop turns an aborted transport needs to close its socket
SUPPRESS_CODES = frozenset({550, 551, 553})  # mailbox unavailable / not local / bad name
# Enhanced status codes (RFC 3463, subject.detail) of a RCPT answer that name the sender's
# address, not the recipient's: they never suppress.
SENDER_ADDRESS_STATUS = frozenset({"1.7", "1.8"})
REPLY_LOGGED = 200  # characters of a server's reply kept in a log line
# Answers before MAIL FROM (a 554 greeting, a refused EHLO, a 535/530 AUTH) refuse the
# account or the connection, not a message: a provider outage.
ACCOUNT_STAGES = frozenset({"connect", "helo", "auth"})
SERVICE_UNAVAILABLE = 421  # at any stage: the server is closing the channel (RFC 5321)
STAGES = {"connect": "the greeting", "helo": "EHLO/HELO", "auth": "AUTH",
          "mail": "MAIL FROM", "rcpt": "RCPT TO", "data": "DATA", "session": "the session"}
_STATUS = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


class _Client(aiosmtplib.SMTP):
    """An SMTP client that knows whether the current transaction reached DATA."""

    data_started = False

    async def data(self, *args: Any, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        self.data_started = True
        return await super().data(*args, **kwargs)


class SmtpProvider:
    """Sends over one SMTP connection, reconnecting when the server drops it."""

    def __init__(self, ctx: ProviderContext) -> None:
        o = Options(ctx, "smtp", ("host", "port", "security", "username", "password",
                                  "timeout", "validate_certs", "max_batch",
                                  "allow_plaintext_auth"))
        self.host = o.text("host", required=True)
        self.port = o.integer("port", DEFAULT_PORT)
        self.security = o.text("security", "starttls").lower()
        if self.security not in ("starttls", "tls", "none"):
            raise ProviderError(f"[providers.{ctx.name}].security: must be starttls, tls "
                                "or none")
        self.username = o.text("username")
        self.password = o.text("password")
        self.timeout = o.number("timeout", DEFAULT_TIMEOUT)
        self.validate_certs = o.boolean("validate_certs", True)
        plaintext = o.boolean("allow_plaintext_auth", False)
        if self.security == "none" and self.username:
            if not plaintext:
                raise ProviderError(
                    f"[providers.{ctx.name}]: security = \"none\" with a username would send "
                    "the password in cleartext; use starttls or tls, or set "
                    "allow_plaintext_auth = true (a relay on this machine or a trusted link)")
            log.warning("smtp.plaintext_auth", provider=ctx.name, host=self.host,
                        hint="the SMTP password crosses the network unencrypted")
        self.name = ctx.name
        self.max_batch = max(1, o.integer("max_batch", MAX_BATCH))
        self.parallel_calls = PARALLEL_CALLS
        self._client: _Client | None = None
        self._lock = anyio.Lock()
        self.connections = 0  # connections opened so far (connection reuse is visible)

    async def _connect(self) -> _Client:
        if self._client is not None and self._client.is_connected:
            return self._client
        client = _Client(
            hostname=self.host, port=self.port, timeout=self.timeout,
            use_tls=self.security == "tls",
            start_tls=self.security == "starttls",
            validate_certs=self.validate_certs,
        )
        await client.connect()
        if self.username:
            try:
                await client.login(self.username, self.password)
            except BaseException:
                await _abort(client)
                raise
        self._client = client
        self.connections += 1
        return client

    async def send(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        results: list[SendResult] = []
        async with self._lock:
            for msg in messages:
                results.append(await self._send_one(msg))
        return results

    async def _send_one(self, msg: OutgoingMessage) -> SendResult:
        client: _Client | None = None
        try:
            client = await self._connect()
            client.data_started = False
            errors, reply = await client.sendmail(
                email.utils.parseaddr(msg.sender)[1], [email.utils.parseaddr(msg.to)[1]],
                msg.mime)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients[0] if exc.recipients else None
            code = refused.code if refused is not None else 550
            return self._answer(msg, "rcpt", code, str(refused.message if refused else exc))
        except aiosmtplib.SMTPResponseException as exc:  # an answer, even to the data: refused
            await self._drop()
            stage = _stage(exc, data_started=client is not None and client.data_started)
            return self._answer(msg, stage, exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self._drop()
            error = f"smtp: {type(exc).__name__}: {exc}"
            if client is not None and client.data_started:
                # The server may have the whole message: its answer never came.
                return SendResult(ok=False, maybe_sent=True,
                                  error=f"{error} (after DATA: may have been sent, not retried)")
            # No answer at all before DATA: the server (or the way to it) is down.
            return SendResult(ok=False, error=error, transient=True, outage=True)
        if errors:
            code, text = next(iter(errors.values()))
            return self._answer(msg, "rcpt", code, text)
        return SendResult(ok=True, provider_message_id=reply.strip() or msg.message_id)

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _abort(client)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                with anyio.move_on_after(self.timeout):
                    await client.quit()
            except aiosmtplib.SMTPException:
                client.close()

    def _answer(self, msg: OutgoingMessage, stage: str, code: int, text: str) -> SendResult:
        """The result for the server's answer ``code`` to ``stage``; a permanent refusal
        that is about the sender is logged as a provider-health problem."""
        result, sender_side = _classify(stage, code, text)
        if sender_side:
            status, reply = _split_status(text)
            log.warning("smtp.sender_rejected", provider=self.name, host=self.host,
                        stage=STAGES.get(stage, stage), code=code, status=status,
                        reply=reply[:REPLY_LOGGED], message=msg.id)
        return result


def _split_status(text: str) -> tuple[str | None, str]:
    """The enhanced status code a reply begins with (``"5.1.1"``), if any, and the rest."""
    m = _STATUS.match(text)
    if m is None:
        return None, text.strip()
    return ".".join(m.groups()), text[m.end():].strip()


def _classify(stage: str, code: int, text: str) -> tuple[SendResult, bool]:
    """The result for an SMTP answer ``code`` (with its reply ``text``) to ``stage``
    (``rcpt``, ``mail``, ``data``, ...), and whether it is a permanent refusal about the
    sender. Only the recipient's fault suppresses (see the module's docstring)."""
    status, reply = _split_status(text)
    where = STAGES.get(stage, stage)
    error = f"smtp {code}{f' {status}' if status else ''} at {where}: {reply}"
    if stage in ACCOUNT_STAGES or code == SERVICE_UNAVAILABLE:  # the server, not the mail
        return SendResult(ok=False, error=error, transient=code < 500, outage=True), False
    if 400 <= code < 500:
        return SendResult(ok=False, error=error, transient=True), False
    detail = status.split(".", 1)[1] if status else None
    if stage == "rcpt":
        if detail is None:
            suppress = code in SUPPRESS_CODES
        elif detail.startswith("7.") or detail in SENDER_ADDRESS_STATUS:
            suppress = False
        else:
            # An enhanced code says what is wrong: only a bad mailbox is the recipient's
            # for good (5.2.2 "mailbox full", 5.3.x "system" pass, or are the server's).
            suppress = detail.startswith("1.") or detail == "2.1"
        sender_side = detail is not None and (detail.startswith("7.")
                                              or detail in SENDER_ADDRESS_STATUS)
    else:
        suppress, sender_side = False, 500 <= code < 600
    if sender_side:
        error += " (a refusal of the sender or the message, not the recipient: not suppressed)"
    return SendResult(ok=False, error=error, suppress=suppress), sender_side


def _stage(exc: aiosmtplib.SMTPResponseException, *, data_started: bool) -> str:
    """Which command ``exc`` answered."""
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
        return "rcpt"
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return "mail"
    if isinstance(exc, aiosmtplib.SMTPDataError) or data_started:
        return "data"
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return "auth"
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        return "connect"
    if isinstance(exc, aiosmtplib.SMTPHeloError):
        return "helo"
    return "session"


async def _abort(client: aiosmtplib.SMTP) -> None:
    """Drop a failed or broken connection at once. A graceful close of a TLS connection
    waits for the server's close_notify, which a server that stalled (as after a refused
    AUTH) never sends: the socket would stay open until garbage collection."""
    transport = client.transport
    if transport is None:
        return
    with contextlib.suppress(Exception):  # aborting a broken connection may fail too
        transport.abort()  # type: ignore[attr-defined]  # a WriteTransport at runtime
    # The socket is closed by a callback the abort schedules: let it run now, so a loop
    # that ends right after this call does not leave the socket to the garbage collector.
    for _ in range(ABORT_TURNS):
        await anyio.lowlevel.checkpoint()
