"""Header limits and addresses in MIME building (#18, delivery): no header line past 998
octets, long subjects folded and split into several encoded-words, IDN domains in IDNA,
non-ASCII local parts refused with a clear error."""

from __future__ import annotations

import datetime as dt
import email
import email.message
import email.policy
import re

import pytest

from segflowd.delivery.mime import (
    InvalidAddress,
    InvalidMessage,
    MessageParts,
    ascii_domain,
    build_message,
    parse_address,
)

MAX_LINE = 998  # octets, RFC 5322 2.1.1
ENCODED_WORD = re.compile(rb"=\?utf-8\?[bq]\?[^?\s]*\?=", re.IGNORECASE)


def parts(**over: object) -> MessageParts:
    base: dict[str, object] = dict(
        row_id=7, kind="campaign", sender="Example <hello@example.com>", to="ann@example.org",
        subject="Hello", html="<p>Hi</p>", text="Hi", message_id="7.abc@example.com",
        date=dt.datetime(2026, 1, 2, 3, 4, 5), reply_to="Support <support@example.com>",
        unsubscribe_url="https://mail.example.com/u/TOKEN")
    base.update(over)
    return MessageParts(**base)  # type: ignore[arg-type]


def head_lines(mime: bytes) -> list[bytes]:
    return mime.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def parse(mime: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(mime, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_a_1500_character_ascii_subject_is_folded_into_lines_under_998_octets() -> None:
    subject = " ".join(f"word{i:04d}" for i in range(167))[:1500]
    assert len(subject) == 1500
    out = build_message(parts(subject=subject))
    lines = head_lines(out.mime)
    assert max(map(len, lines)) <= MAX_LINE
    subject_lines = [i for i, line in enumerate(lines) if line.startswith(b"Subject:")]
    assert len(subject_lines) == 1
    start = subject_lines[0]
    assert lines[start + 1][:1] == b" "  # folded: continuation lines follow
    assert str(parse(out.mime)["Subject"]) == subject  # and unfolds to the same text
    assert out.subject == subject  # the unfolded text for JSON APIs


def test_an_ascii_subject_without_spaces_goes_as_several_encoded_words() -> None:
    subject = "x" * 1500
    out = build_message(parts(subject=subject))
    lines = head_lines(out.mime)
    assert max(map(len, lines)) <= MAX_LINE
    head = out.mime.split(b"\r\n\r\n", 1)[0]
    assert len(ENCODED_WORD.findall(head)) > 1
    assert str(parse(out.mime)["Subject"]) == subject


def test_a_400_character_non_ascii_subject_is_split_into_encoded_words_and_sent() -> None:
    subject = ("Grüße aus Köln, señor ñandú — 東京 " * 20)[:400]
    out = build_message(parts(subject=subject))
    head = out.mime.split(b"\r\n\r\n", 1)[0]
    words = ENCODED_WORD.findall(head)
    assert len(words) > 1
    assert all(len(w) <= 75 for w in words)  # RFC 2047 2: at most 75 characters each
    assert max(map(len, head_lines(out.mime))) <= MAX_LINE
    assert head.isascii()
    assert str(parse(out.mime)["Subject"]) == " ".join(subject.split())


def test_a_short_subject_stays_on_one_line() -> None:
    out = build_message(parts(subject="A perfectly ordinary subject line, " * 2))
    lines = head_lines(out.mime)
    assert not any(line[:1].isspace() for line in lines)


def test_a_long_display_name_is_folded_too() -> None:
    name = " ".join(["Annabelle"] * 150)
    out = build_message(parts(to=f'"{name}" <ann@example.org>'))
    assert max(map(len, head_lines(out.mime))) <= MAX_LINE
    [to] = parse(out.mime)["To"].addresses
    assert (to.display_name, to.addr_spec) == (name, "ann@example.org")


@pytest.mark.parametrize(("raw", "addr_spec"), [
    ("x@bücher.example", "x@xn--bcher-kva.example"),
    ("Jörg <jorg@Bücher.Example>", "jorg@xn--bcher-kva.example"),
    ("info@例え.jp", "info@xn--r8jz45g.jp"),
])
def test_idn_domains_go_out_as_idna(raw: str, addr_spec: str) -> None:
    out = build_message(parts(to=raw))
    assert out.mime.split(b"\r\n\r\n", 1)[0].isascii()
    [to] = parse(out.mime)["To"].addresses
    assert to.addr_spec == addr_spec
    assert email.utils.parseaddr(out.to)[1] == addr_spec  # what SMTP's RCPT TO gets


def test_an_idn_sender_domain_is_encoded_as_well() -> None:
    out = build_message(parts(sender="Shop <shop@bücher.example>"))
    assert parse(out.mime)["From"].addresses[0].addr_spec == "shop@xn--bcher-kva.example"


@pytest.mark.parametrize("raw", ["jörg@example.org", "Jörg <用户@example.org>"])
def test_a_non_ascii_local_part_is_refused_with_a_clear_error(raw: str) -> None:
    with pytest.raises(InvalidAddress, match=r"non-ASCII local part.*SMTPUTF8"):
        build_message(parts(to=raw))


def test_an_invalid_internationalised_domain_is_refused_not_a_unicode_error() -> None:
    with pytest.raises(InvalidAddress, match="not a valid internationalised domain"):
        parse_address("x@bü\u0301cher\u200d.example", "recipient")
    with pytest.raises(InvalidAddress, match="not a valid internationalised domain"):
        ascii_domain("-bücher-.example")


def test_a_header_that_would_carry_non_ascii_text_fails_the_message_clearly() -> None:
    """Nothing emits 8-bit header text (it would need SMTPUTF8): the message fails alone
    with :class:`InvalidMessage` naming the header, not a ``UnicodeError``."""
    with pytest.raises(InvalidMessage, match="List-Unsubscribe holds non-ASCII text"):
        build_message(parts(unsubscribe_url="https://bücher.example/u/TOKEN"))
