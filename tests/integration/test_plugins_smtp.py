"""The smtp provider against a real SMTP server (aiosmtpd) on a loopback port."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import gc
import socket
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from delivery_harness import add_user, make_kernel, message_row

from segflow_plugins.smtp import SmtpProvider
from segflowd.delivery.mime import MessageParts, build_message
from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.providers import ProviderContext
from segflowd.schema import suppressions
from segflowd.store import Store

pytestmark = pytest.mark.anyio

STALL = 30.0  # seconds the server keeps a message without answering (cut by its stop)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Inbox:
    """An aiosmtpd handler keeping what it receives; refuses ``*@refused.example``.

    After the message's data it answers ``*@bounce.example`` with 554, never answers
    ``*@stall.example`` and drops the connection of ``*@drop.example``.
    """

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self.connections = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope: Envelope, address: str,  # type: ignore[no-untyped-def]
                          rcpt_options):
        if address.endswith("@refused.example"):
            return "550 5.1.1 no such user"
        if address.endswith("@busy.example"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session: Session, envelope: Envelope) -> str:  # type: ignore[no-untyped-def]
        rcpt = envelope.rcpt_tos[0]
        if rcpt.endswith("@bounce.example"):
            return "554 5.7.1 message refused"
        self.received.append((str(envelope.mail_from), list(envelope.rcpt_tos),
                              bytes(envelope.original_content or b"")))
        if rcpt.endswith("@stall.example"):
            await asyncio.sleep(STALL)  # the server has the message, and never answers
        if rcpt.endswith("@drop.example"):
            server.transport.abort()
            await asyncio.sleep(STALL)
        return "250 2.0.0 queued as X1"


def self_signed(tmp: Path) -> ssl.SSLContext:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return ctx


@pytest.fixture
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def authenticator(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"mailer" \
        and auth_data.password == b"pw"
    return AuthResult(success=ok)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port,
                            tls_context=self_signed(tmp_path), require_starttls=True,
                            authenticator=authenticator, auth_required=True)
    controller.start()
    try:
        yield inbox, port
    finally:
        # aiosmtpd stalls a session after a refused AUTH and, stopping, leaves that
        # session's transport (its side, in its own thread's loop) unclosed. Collect it
        # here, quietly: a leak of the test server, not of the code under test (whose
        # side is aborted and closed; see segflow_plugins.smtp._abort).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            controller.stop()
            gc.collect()


def outgoing(i: int, to: str) -> object:
    return build_message(MessageParts(
        row_id=i, kind="transaction", sender="Example <hello@example.com>", to=to,
        subject=f"Message {i}", html=f"<p>{i}</p>", text=str(i), message_id=f"{i}.x@example.com",
        date=dt.datetime(2026, 1, 1)))


async def test_messages_arrive_over_one_reused_connection(
        smtp_server: tuple[Inbox, int], tmp_path: Path) -> None:
    inbox, port = smtp_server
    p = SmtpProvider(ProviderContext("smtp", {"host": "127.0.0.1", "port": port,
                                              "security": "none"}, tmp_path))
    try:
        results = await p.send([outgoing(i, f"user{i}@example.org") for i in range(3)])  # type: ignore[misc]
        results += await p.send([outgoing(3, "user3@example.org")])  # type: ignore[list-item]
    finally:
        await p.aclose()
    assert [r.ok for r in results] == [True] * 4
    assert [rcpt for _, rcpt, _ in inbox.received] == [[f"user{i}@example.org"] for i in range(4)]
    assert inbox.received[0][0] == "hello@example.com"
    msg = email.message_from_bytes(inbox.received[0][2], policy=email.policy.default)
    assert msg["Subject"] == "Message 0"
    assert p.connections == 1  # connection reuse


async def test_refusals_map_to_permanent_suppress_and_transient(
        smtp_server: tuple[Inbox, int], tmp_path: Path) -> None:
    _inbox, port = smtp_server
    p = SmtpProvider(ProviderContext("smtp", {"host": "127.0.0.1", "port": port,
                                              "security": "none"}, tmp_path))
    try:
        refused, busy, fine = await p.send([
            outgoing(1, "x@refused.example"), outgoing(2, "x@busy.example"),  # type: ignore[list-item]
            outgoing(3, "ok@example.org")])  # type: ignore[list-item]
    finally:
        await p.aclose()
    assert (refused.ok, refused.transient, refused.suppress) == (False, False, True)
    assert "550" in (refused.error or "")
    assert (busy.ok, busy.transient) == (False, True)
    assert fine.ok


async def test_starttls_with_auth(tls_server: tuple[Inbox, int], tmp_path: Path) -> None:
    inbox, port = tls_server
    p = SmtpProvider(ProviderContext("smtp", {
        "host": "127.0.0.1", "port": port, "security": "starttls", "username": "mailer",
        "password": "pw", "validate_certs": False}, tmp_path))
    try:
        [result] = await p.send([outgoing(1, "ann@example.org")])  # type: ignore[list-item]
    finally:
        await p.aclose()
    assert result.ok, result.error
    assert len(inbox.received) == 1


async def test_wrong_password_is_not_a_silent_success(
        tls_server: tuple[Inbox, int], tmp_path: Path) -> None:
    p = SmtpProvider(ProviderContext("smtp", {
        "host": "127.0.0.1", "port": tls_server[1], "security": "starttls",
        "username": "mailer", "password": "nope", "validate_certs": False,
        "timeout": 2}, tmp_path))  # aiosmtpd stalls after a refused AUTH: do not wait 30 s
    try:
        [result] = await p.send([outgoing(1, "ann@example.org")])  # type: ignore[list-item]
    finally:
        await p.aclose()
    assert not result.ok
    assert tls_server[0].received == []
    # The account is refused, not the message (aiosmtpd then stalls: the answer to AUTH
    # or the timeout after it): an outage, held without spending an attempt.
    assert (result.outage, result.maybe_sent) == (True, False)


async def test_delivery_through_smtp_end_to_end(
        store: Store, tmp_path: Path, smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    setup = make_kernel(store, tmp_path, provider="mail", options=(
        f'plugin = "smtp"\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'
        "concurrency = 2\n"))
    await add_user(store, "u1", "ann@example.org", name="Ann")
    await add_user(store, "u2", "bob@refused.example", name="Bob")
    ids = []
    async with store.begin() as conn:
        for user in ("u1", "u2"):
            mid = await enqueue(conn, kind="campaign", template="welcome", now=setup.clock.now(),
                                user_id=user, dedupe_key=f"k-{user}", data={"plan": "pro"})
            ids.append(mid)
    svc = DeliveryService(setup.kernel)  # the provider is loaded by name from its entry point
    try:
        # One message per send call (the plugin's default), over one reused connection.
        assert await svc.run_once() == 1
        assert await svc.run_once() == 1
        assert await svc.run_once() == 0
    finally:
        await svc.provider.aclose()
    assert [rcpt for _, rcpt, _ in inbox.received] == [["ann@example.org"]]
    msg = email.message_from_bytes(inbox.received[0][2], policy=email.policy.default)
    assert msg["Subject"] == "Welcome Ann!"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert (await message_row(store, ids[0]))["status"] == "sent"
    assert (await message_row(store, ids[1]))["status"] == "failed"
    async with store.connect() as conn:
        rows = (await conn.execute(suppressions.select())).mappings().all()
    assert [(r["address"], r["source"]) for r in rows] == [("bob@refused.example", "mail")]


# -- what a failure means: certainly not sent (retry) or maybe sent (unknown) -------------------

def plain(port: int, tmp_path: Path, **opts: object) -> SmtpProvider:
    return SmtpProvider(ProviderContext("smtp", {"host": "127.0.0.1", "port": port,
                                                 "security": "none", **opts}, tmp_path))


@pytest.mark.parametrize("domain", ["stall.example", "drop.example"])
async def test_no_answer_after_data_is_maybe_sent_and_the_next_message_still_goes(
        smtp_server: tuple[Inbox, int], tmp_path: Path, domain: str) -> None:
    inbox, port = smtp_server
    p = plain(port, tmp_path, timeout=0.5)
    try:
        lost, fine = await p.send([outgoing(1, f"x@{domain}"),  # type: ignore[list-item]
                                   outgoing(2, "ok@example.org")])  # type: ignore[list-item]
    finally:
        await p.aclose()
    assert (lost.ok, lost.maybe_sent) == (False, True)
    assert "smtp" in (lost.error or "")
    assert fine.ok
    assert [rcpt for _, rcpt, _ in inbox.received] == [[f"x@{domain}"], ["ok@example.org"]]


async def test_answered_refusals_and_no_server_are_certainly_not_sent(
        smtp_server: tuple[Inbox, int], tmp_path: Path) -> None:
    _inbox, port = smtp_server
    p = plain(port, tmp_path)
    try:
        busy, bounced = await p.send([outgoing(1, "x@busy.example"),  # type: ignore[list-item]
                                      outgoing(2, "x@bounce.example")])  # type: ignore[list-item]
    finally:
        await p.aclose()
    assert (busy.ok, busy.transient, busy.maybe_sent) == (False, True, False)
    assert (bounced.ok, bounced.transient, bounced.maybe_sent) == (False, False, False)
    assert "554" in (bounced.error or "")
    p = plain(free_port(), tmp_path)  # nothing listens there
    try:
        [refused] = await p.send([outgoing(3, "ok@example.org")])  # type: ignore[list-item]
    finally:
        await p.aclose()
    assert (refused.ok, refused.transient, refused.maybe_sent) == (False, True, False)
    assert refused.outage  # no server: the provider is down, not the message
    assert not busy.outage
    assert not bounced.outage


async def test_delivery_records_a_timeout_after_data_unknown_and_never_resends_it(
        store: Store, tmp_path: Path, smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    setup = make_kernel(store, tmp_path, provider="mail", options=(
        f'plugin = "smtp"\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'
        "timeout = 0.5\n"))
    await add_user(store, "u1", "ann@stall.example", name="Ann")
    async with store.begin() as conn:
        mid = await enqueue(conn, kind="campaign", template="welcome", now=setup.clock.now(),
                            user_id="u1", dedupe_key="k-u1", data={"plan": "pro"})
    svc = DeliveryService(setup.kernel)
    try:
        assert await svc.run_once() == 1
        setup.clock.set(setup.clock.now() + dt.timedelta(days=1))
        assert await svc.run_once() == 0
    finally:
        await svc.provider.aclose()
    row = await message_row(store, mid)
    assert row["status"] == "unknown"
    assert "smtp" in row["last_error"]
    assert len(inbox.received) == 1
