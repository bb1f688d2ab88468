"""Control characters never reach a header, and data holding ``=?...?=`` is never read as
an RFC 2047 encoded-word (#25 item 14).

Users come in over the ingest API with NUL, BEL, ESC, DEL and C1 controls in the
attribute a template's subject uses, and with an encoded-word as their display name;
each message goes through the daemon's real delivery path to the outbox provider's
``.eml``, which is read back byte for byte and parsed as a mail client would. CR/LF
handling is the header-injection test's; this one keeps a line break case as a control.
"""

from __future__ import annotations

import datetime as dt
import email
import email.message
import email.policy
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asgi_daemon import running
from security_mail import SIGNING_KEY, Delivered, deliver, mail_app, put_user

from segflowd.daemon import Daemon
from segflowd.delivery.mime import MessageParts, build_message

pytestmark = pytest.mark.anyio

CONTROLS = ["\x00", "\x01", "\x07", "\x08", "\x1b", "\x1b[2J", "\x7f", "\x9b", "\x9b31m"]
# A byte that is a control character, except the CR LF ending each header line.
RAW_CONTROL = re.compile(rb"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
ENCODED_WORDS = ["=?utf-8?q?Admin?=", "=?UTF-8?B?QWRtaW4=?=",
                 "Ann =?utf-8?q?=0D=0ABcc:_victim@example.net?= Lee"]


@pytest.fixture
async def daemon(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running(tmp_path / "d", sqlite_url, app=mail_app(tmp_path),
                       environ={"SEGFLOW_EMAIL_SECRET": SIGNING_KEY}) as d:
        yield d


def head_of(sent: Delivered) -> bytes:
    assert sent.eml is not None
    return sent.eml.split(b"\r\n\r\n", 1)[0] + b"\r\n"


async def test_control_characters_in_subject_data_are_dropped(daemon: Daemon) -> None:
    for i, control in enumerate([*CONTROLS, "\r\n"]):
        uid = f"user-{i}"
        await put_user(daemon, uid, {"email": f"{uid}@example.org",
                                     "name": f"Ann{control}Lee"})
        sent = await deliver(daemon, uid, plan=f"pro{control}")
        assert sent.status == "sent", (control, sent.last_error)
        head = head_of(sent)
        assert RAW_CONTROL.search(head) is None, (control, head)
        subject = str(sent.parsed()["Subject"])
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in subject), subject
        # What remains of each control is nothing, or the text after it ("[2J", "31m").
        rest = control.lstrip("\x00\x01\x07\x08\x1b\x7f\x9b")
        expected = "News for Ann Lee on pro" if control == "\r\n" else \
            f"News for Ann{rest}Lee on pro{rest}"
        assert subject == expected.strip()


async def test_a_display_name_holding_an_encoded_word_reads_back_as_written(
        daemon: Daemon) -> None:
    for i, name in enumerate(ENCODED_WORDS):
        uid = f"named-{i}"
        await put_user(daemon, uid, {"email": f'"{name}" <{uid}@example.org>',
                                     "name": "Eve"})
        sent = await deliver(daemon, uid, plan="pro")
        assert sent.status == "sent", (name, sent.last_error)
        head = head_of(sent)
        to_line = next(line for line in head.split(b"\r\n") if line.startswith(b"To:"))
        assert name.encode() not in to_line  # not as it is: it goes out encoded
        [to] = sent.parsed()["To"].addresses
        assert to.display_name == name  # a reader shows the data, not its decoding
        assert to.addr_spec == f"{uid}@example.org"
        assert sent.parsed()["Bcc"] is None


def test_a_sender_display_name_gets_the_same_treatment() -> None:
    """``From`` and ``Reply-To`` are built by the same code as ``To``."""
    out = build_message(MessageParts(
        row_id=1, kind="transaction", sender='"=?utf-8?q?Bank?=\x1b" <hello@example.com>',
        to="Ann\x07 <ann@example.org>", subject="Hi\x00 there\x1b", html="<p>x</p>",
        text="x", message_id="1.a@example.com", date=dt.datetime(2026, 1, 2, 3, 4, 5),
        reply_to="=?utf-8?q?Help?= <help@example.com>"))
    head = out.mime.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert RAW_CONTROL.search(head) is None
    assert b"=?utf-8?q?Bank?=" not in head
    assert b"=?utf-8?q?Help?=" not in head
    msg = email.message_from_bytes(out.mime, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    assert msg["From"].addresses[0].display_name == "=?utf-8?q?Bank?="
    assert msg["Reply-To"].addresses[0].display_name == "=?utf-8?q?Help?="
    assert msg["To"].addresses[0].display_name == "Ann"
    assert str(msg["Subject"]) == "Hi there"
    assert out.subject == "Hi there"  # what an API provider (Postmark, SES) is given
    assert "\x1b" not in out.sender
    assert "\x07" not in out.to
