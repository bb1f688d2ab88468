"""One bad address does not strand a batch (#18, delivery), against a real SMTP server
(aiosmtpd on a loopback port) through the ``smtp`` provider, on both stores.

One claimed batch holds an IDN recipient (sent, as IDNA), a non-ASCII local part (fails
alone, with a clear error, before the provider is asked), a long non-ASCII subject (sent,
split into encoded-words) and ordinary messages (sent): nothing is left ``sending``.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session
from delivery_harness import add_user, make_kernel, message_row

from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.schema import messages
from segflowd.store import Store

pytestmark = pytest.mark.anyio

MAX_LINE = 998  # octets per line, RFC 5322 2.1.1
LONG_SUBJECT = ("Grüße aus Köln — señor ñandú, 東京 " * 20)[:400]


class Inbox:
    """An aiosmtpd handler keeping every envelope and message it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[list[str], bytes]] = []
        self.rcpt_attempts: list[str] = []

    async def handle_RCPT(self, server, session, envelope: Envelope, address: str,  # type: ignore[no-untyped-def]
                          rcpt_options):
        self.rcpt_attempts.append(address)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session: Session, envelope: Envelope) -> str:  # type: ignore[no-untyped-def]
        self.received.append((list(envelope.rcpt_tos),
                              bytes(envelope.original_content or b"")))
        return "250 2.0.0 queued"


@pytest.fixture
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


async def test_a_batch_with_idn_and_non_ascii_addresses_is_not_stranded(
        store: Store, tmp_path: Path, smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    # max_batch = 10: the whole batch is claimed (and marked sending) at once.
    setup = make_kernel(store, tmp_path, provider="mail", options=(
        f'plugin = "smtp"\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'
        "max_batch = 10\n"))
    users = {"ann": "ann@example.org", "idn": "x@bücher.example", "utf8": "jörg@example.org",
             "long": "bob@example.org", "zoe": "Zoe <zoe@example.org>"}
    for uid, addr in users.items():
        await add_user(store, uid, addr, name=uid.title())
    ids: dict[str, int] = {}
    async with store.begin() as conn:
        for uid in users:
            template, data = ("welcome", {"plan": "pro"})
            if uid == "long":
                template, data = "headline", {"headline": LONG_SUBJECT, "amount": 1}
            mid = await enqueue(conn, kind="campaign", template=template,
                                now=setup.clock.now(), user_id=uid, dedupe_key=f"k-{uid}",
                                data=data, campaign="onboarding")
            assert mid is not None
            ids[uid] = mid
    svc = DeliveryService(setup.kernel)
    try:
        assert await svc.run_once() == len(users)
    finally:
        await svc.provider.aclose()

    statuses = {uid: (await message_row(store, mid)) for uid, mid in ids.items()}
    assert {uid: r["status"] for uid, r in statuses.items()} == {
        "ann": "sent", "idn": "sent", "utf8": "failed", "long": "sent", "zoe": "sent"}
    error = statuses["utf8"]["last_error"]
    assert "non-ASCII local part" in error
    assert "SMTPUTF8" in error
    async with store.connect() as conn:
        left = (await conn.execute(sa.select(sa.func.count()).select_from(messages)
                                   .where(messages.c.status.in_(("claimed", "sending"))))).scalar()
    assert left == 0

    # The failed one never reached the server; the IDN one went out in IDNA.
    assert sorted(inbox.rcpt_attempts) == sorted([
        "ann@example.org", "x@xn--bcher-kva.example", "bob@example.org", "zoe@example.org"])
    by_rcpt = {rcpt[0]: parse(raw) for rcpt, raw in inbox.received}
    assert by_rcpt["x@xn--bcher-kva.example"]["To"].addresses[0].addr_spec == \
        "x@xn--bcher-kva.example"
    assert str(by_rcpt["x@xn--bcher-kva.example"]["Subject"]) == "Welcome Idn!"

    # The 400-character non-ASCII subject arrives whole, in lines RFC 5322 allows.
    raw_long = next(raw for rcpt, raw in inbox.received if rcpt == ["bob@example.org"])
    head = raw_long.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    assert max(len(line) for line in head.split(b"\r\n")) <= MAX_LINE
    assert head.count(b"=?utf-8?") > 1  # several encoded-words
    assert str(by_rcpt["bob@example.org"]["Subject"]) == " ".join(LONG_SUBJECT.split())
