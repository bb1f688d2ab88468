"""The ``smtp`` provider: aiosmtplib over TLS, STARTTLS or plain, with one reused connection.

Options: ``host``, ``port`` (default 587), ``security`` (``starttls`` the default, ``tls``
for implicit TLS on 465, ``none``), ``username``/``password`` (or ``password_env``),
``timeout`` (seconds), ``validate_certs`` (default true), ``max_batch``.

5xx answers for a recipient are permanent (550/551/553 also suppress the address); 4xx
answers are transient, as are a refused or lost connection before DATA: nothing was sent.
Once DATA began, a timeout or a lost connection leaves the outcome open: the server may
have the whole message, so it is *maybe sent* (``unknown``, never re-sent). An answer
refusing the data is still a refusal (nothing was taken).
"""

from __future__ import annotations

import contextlib
import email.utils
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
ABORT_TURNS = 3  # event-loop turns an aborted transport needs to close its socket
SUPPRESS_CODES = frozenset({550, 551, 553})  # mailbox unavailable / not local / bad name


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
        self.max_batch = max(1, o.integer("max_batch", MAX_BATCH))
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
            return _answer(code, str(refused.message if refused else exc))
        except aiosmtplib.SMTPResponseException as exc:  # an answer, even to the data: refused
            await self._drop()
            return _answer(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self._drop()
            error = f"smtp: {type(exc).__name__}: {exc}"
            if client is not None and client.data_started:
                # The server may have the whole message: its answer never came.
                return SendResult(ok=False, maybe_sent=True,
                                  error=f"{error} (after DATA: may have been sent, not retried)")
            return SendResult(ok=False, error=error, transient=True)
        if errors:
            code, text = next(iter(errors.values()))
            return _answer(code, text)
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


def _answer(code: int, text: str) -> SendResult:
    error = f"smtp {code}: {text}"
    if 400 <= code < 500:
        return SendResult(ok=False, error=error, transient=True)
    return SendResult(ok=False, error=error, suppress=code in SUPPRESS_CODES)


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
