"""Line breaks in user data cannot add an email header (nor start the body early).

Users come in over the ingest API with CR, LF and other line-breaking characters in the
attribute a template's subject uses, in the data a send carries, and in the address
(with its display name) the message goes to. Each message goes through the daemon's
real delivery path to the outbox provider's ``.eml``, which is parsed back: it has
exactly the headers segflowd writes, each on one line; a recipient that is not one
clean address fails the message and nothing is written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asgi_daemon import running
from security_mail import SIGNING_KEY, Delivered, deliver, mail_app, put_user

from segflowd.daemon import Daemon

pytestmark = pytest.mark.anyio

# The harness's public_url is http://, so no List-Unsubscribe-Post (RFC 8058 wants https).
HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "List-Unsubscribe",
           "Precedence", "Auto-Submitted", "MIME-Version", "Content-Type"]
BREAKS = ["\r\n", "\n", "\r", "\r\n\r\n", "\n\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e",
          "\x85", "\u2028", "\u2029", "\r\n\t", "\r\n "]
INJECTIONS = [f"Ann{b}Bcc: victim@example.net" for b in BREAKS] + [
    "Ann\r\nBcc: victim@example.net\r\nX-Injected: yes",
    "Ann\r\n\r\n<html>a body of the attacker's</html>",
    "Ann\r\nContent-Type: text/html\r\n\r\n<script>x</script>",
    "Ann\r\nSubject: second subject",
    "=?utf-8?q?Ann=0D=0ABcc:_victim@example.net?=",
]
BAD_RECIPIENTS = [
    "ann@example.org\r\nBcc: victim@example.net",
    "ann@example.org\nBcc: victim@example.net",
    "Eve\r\nBcc: victim@example.net <eve@example.org>",
    "Eve\n <eve@example.org>",
    "eve@example.org, victim@example.net",
    "Eve <eve@example.org>, victim@example.net",
    "eve@example.org\r\n\r\nbody",
]


@pytest.fixture
async def daemon(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running(tmp_path / "d", sqlite_url, app=mail_app(tmp_path),
                       environ={"SEGFLOW_EMAIL_SECRET": SIGNING_KEY}) as d:
        yield d


def assert_only_our_headers(sent: Delivered) -> None:
    assert sent.eml is not None
    head = sent.eml.split(b"\r\n\r\n", 1)[0]
    unfolded = head.replace(b"\r\n", b"\n")
    assert b"\r" not in unfolded  # no bare CR
    lines = unfolded.split(b"\n")
    assert not any(line[:1].isspace() for line in lines)  # no folded continuation either
    names = [line.split(b":", 1)[0].decode() for line in lines]
    assert names == HEADERS
    msg = sent.parsed()
    assert msg["Bcc"] is None
    assert msg["X-Injected"] is None
    assert msg.get_all("Subject") is not None
    assert len(msg.get_all("Subject")) == 1  # type: ignore[arg-type]
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]


async def test_line_breaks_in_a_subject_attribute_or_send_data_stay_in_the_subject(
        daemon: Daemon) -> None:
    for i, injected in enumerate(INJECTIONS):
        uid = f"user-{i}"
        await put_user(daemon, uid, {"email": f"{uid}@example.org", "name": injected})
        sent = await deliver(daemon, uid, plan="pro" + injected.removeprefix("Ann"))
        assert sent.status == "sent", (injected, sent.last_error)
        assert_only_our_headers(sent)
        # What the reader sees is what the template rendered, on one line.
        rendered = f"News for {injected} on pro{injected.removeprefix('Ann')}"
        assert str(sent.parsed()["Subject"]) == " ".join(rendered.split())
        assert sent.parsed()["To"] == f"{uid}@example.org"


async def test_a_recipient_that_is_not_one_clean_address_fails_and_nothing_is_written(
        daemon: Daemon) -> None:
    for i, address in enumerate(BAD_RECIPIENTS):
        uid = f"bad-{i}"
        await put_user(daemon, uid, {"email": address, "name": "Eve"})
        sent = await deliver(daemon, uid, plan="pro")
        assert sent.status == "failed", address
        assert sent.eml is None, address
    # A display name with a line-breaking character that is not CR/LF is encoded, not
    # taken as a line end: the message goes out with one To and no injected header.
    await put_user(daemon, "named", {"email": "Eve\u2028Bcc: v@example.net <eve@example.org>",
                                     "name": "Eve"})
    sent = await deliver(daemon, "named", plan="pro")
    if sent.status == "sent":
        assert_only_our_headers(sent)
        assert [a.addr_spec for a in sent.parsed()["To"].addresses] == ["eve@example.org"]
    else:
        assert sent.status == "failed"
