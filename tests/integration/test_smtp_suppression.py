"""SMTP refusals suppress the recipient only for the recipient's fault: a real aiosmtpd
server answers MAIL FROM, RCPT TO or DATA with the code under test."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session
from delivery_harness import add_user, make_kernel, message_row
from structlog.testing import capture_logs

from segflow_plugins.smtp import SmtpProvider
from segflowd.delivery.mime import MessageParts, build_message
from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.providers import OutgoingMessage, ProviderContext
from segflowd.schema import suppressions
from segflowd.store import Store

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def outgoing(i: int, to: str) -> OutgoingMessage:
    return build_message(MessageParts(
        row_id=i, kind="transaction", sender="Example <hello@example.com>", to=to,
        subject=f"Message {i}", html=f"<p>{i}</p>", text=str(i), message_id=f"{i}.x@example.com",
        date=dt.datetime(2026, 1, 1)))


@dataclasses.dataclass
class Stages:
    """An aiosmtpd handler answering each stage with the answer set for it (None: OK)."""

    mail: str | None = None
    rcpt: str | None = None
    data: str | None = None
    received: int = 0

    async def handle_MAIL(self, server, session: Session, envelope: Envelope,  # type: ignore[no-untyped-def]
                          address: str, mail_options):
        if self.mail:
            return self.mail
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server, session: Session, envelope: Envelope,  # type: ignore[no-untyped-def]
                          address: str, rcpt_options):
        if self.rcpt:
            return self.rcpt
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session: Session, envelope: Envelope) -> str:  # type: ignore[no-untyped-def]
        if self.data:
            return self.data
        self.received += 1
        return "250 2.0.0 queued"


@pytest.fixture
def server() -> Iterator[tuple[Stages, int]]:
    handler = Stages()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


# (stage, answer, suppressed, sender-side): what each answer means for the recipient.
CASES = [
    ("rcpt", "550 5.1.1 <x@example.org>: no such user", True, False),
    ("rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", True, False),
    ("rcpt", "554 5.1.1 unknown recipient", True, False),  # 5.1.x whatever the code
    ("rcpt", "552 5.2.1 mailbox disabled", True, False),
    ("rcpt", "550 mailbox unavailable", True, False),  # bare 550/551/553
    ("rcpt", "551 user not local", True, False),
    ("rcpt", "553 mailbox name not allowed", True, False),
    # With an enhanced code, only a bad mailbox: not routing (5.4.x), not a full one.
    ("rcpt", "550 5.4.1 Recipient address rejected: Access denied", False, False),
    ("rcpt", "550 5.2.2 mailbox full", False, False),
    ("rcpt", "550 5.7.1 Relaying denied", False, True),
    ("rcpt", "554 5.7.1 Service unavailable; client host blocked", False, True),
    ("rcpt", "550 5.7.26 unauthenticated mail is prohibited (DMARC)", False, True),
    ("rcpt", "550 5.1.8 Sender address rejected: Domain not found", False, True),
    ("rcpt", "554 rejected", False, False),  # a permanent failure, but not the mailbox's
    ("rcpt", "552 5.2.2 mailbox full", False, False),
    ("rcpt", "450 4.1.1 try later", False, False),
    ("mail", "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
     False, True),
    ("mail", "553 sender address rejected", False, True),
    ("mail", "550 5.1.1 sender unknown", False, True),
    ("data", "550 5.7.1 message rejected as spam", False, True),
    ("data", "554 5.7.1 DMARC policy rejection", False, True),
    ("data", "550 rejected", False, True),
]


@pytest.mark.parametrize(("stage", "reply", "suppressed", "sender_side"), CASES)
async def test_only_a_recipient_fault_at_rcpt_suppresses(
        server: tuple[Stages, int], tmp_path: Path, stage: str, reply: str,
        suppressed: bool, sender_side: bool) -> None:
    handler, port = server
    setattr(handler, stage, reply)
    p = SmtpProvider(ProviderContext("mail", {"host": "127.0.0.1", "port": port,
                                              "security": "none"}, tmp_path))
    try:
        with capture_logs() as logs:
            [result] = await p.send([outgoing(7, "x@example.org")])
    finally:
        await p.aclose()
    code = int(reply[:3])
    assert not result.ok
    assert (result.suppress, result.transient) == (suppressed, code < 500)
    assert not result.maybe_sent
    assert reply.split(" ", 1)[0] in (result.error or "")
    stage_name = {"mail": "MAIL FROM", "rcpt": "RCPT TO", "data": "DATA"}[stage]
    assert f"at {stage_name}" in (result.error or "")
    rejected = [e for e in logs if e["event"] == "smtp.sender_rejected"]
    if sender_side:
        [event] = rejected
        assert event["log_level"] == "warning"
        assert (event["stage"], event["code"], event["provider"], event["message"]) == (
            stage_name, code, "mail", 7)
        status = reply.split()[1]
        assert event["status"] == (status if status[0].isdigit() else None)
    else:
        assert rejected == []
    assert handler.received == 0


async def suppression_rows(store: Store) -> list[tuple[str, str, str | None]]:
    async with store.connect() as conn:
        rows = (await conn.execute(sa.select(suppressions).order_by(
            suppressions.c.address))).mappings().all()
    return [(r["address"], r["reason"], r["source"]) for r in rows]


async def deliver(store: Store, tmp_path: Path, port: int, address: str) -> int:
    setup = make_kernel(store, tmp_path, provider="mail", options=(
        f'plugin = "smtp"\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'))
    await add_user(store, "u1", address, name="Ann")
    async with store.begin() as conn:
        mid = await enqueue(conn, kind="campaign", template="welcome", now=setup.clock.now(),
                            user_id="u1", dedupe_key="k-u1", data={"plan": "pro"})
    svc = DeliveryService(setup.kernel)
    try:
        assert await svc.run_once() == 1
        setup.clock.set(setup.clock.now() + dt.timedelta(days=1))
        assert await svc.run_once() == 0  # failed for good: not retried
    finally:
        await svc.provider.aclose()
    return mid


async def test_a_bad_mailbox_is_suppressed_with_its_smtp_codes(
        store: Store, tmp_path: Path, server: tuple[Stages, int]) -> None:
    handler, port = server
    handler.rcpt = "550 5.1.1 <ann@example.org>: Recipient address rejected"
    mid = await deliver(store, tmp_path, port, "Ann@Example.org")
    row = await message_row(store, mid)
    assert row["status"] == "failed"
    assert await suppression_rows(store) == [("ann@example.org", "bounce:550 5.1.1", "mail")]
    async with store.connect() as conn:
        detail = (await conn.execute(sa.select(suppressions.c.detail))).scalar_one()
    assert detail.startswith("smtp 550 5.1.1 at RCPT TO:")


@pytest.mark.parametrize(("stage", "reply"), [
    ("mail", "550 5.7.60 not allowed to send as this sender"),
    ("rcpt", "550 5.7.1 Relaying denied"),
    ("data", "550 5.7.1 spam rejected"),
])
async def test_a_sender_side_refusal_fails_the_message_and_suppresses_nobody(
        store: Store, tmp_path: Path, server: tuple[Stages, int], stage: str,
        reply: str) -> None:
    handler, port = server
    setattr(handler, stage, reply)
    with capture_logs() as logs:
        mid = await deliver(store, tmp_path, port, "ann@example.org")
    row = await message_row(store, mid)
    assert row["status"] == "failed"
    assert "not suppressed" in row["last_error"]
    assert await suppression_rows(store) == []
    assert [e["code"] for e in logs if e["event"] == "smtp.sender_rejected"] == [550]
