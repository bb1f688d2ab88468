"""MIME building, parsed back with the stdlib: structure, headers, no header injection."""

from __future__ import annotations

import datetime as dt
import email
import email.policy

import pytest

from segflowd.delivery.mime import InvalidAddress, MessageParts, build_message, parse_address


def parts(**over: object) -> MessageParts:
    base: dict[str, object] = dict(
        row_id=7, kind="campaign", sender="Example <hello@example.com>", to="ann@example.org",
        subject="Hello", html="<p>Héllo</p>", text="Héllo", message_id="7.abc@example.com",
        date=dt.datetime(2026, 1, 2, 3, 4, 5), reply_to="Support <support@example.com>",
        unsubscribe_url="https://mail.example.com/u/TOKEN",
        unsubscribe_mailto="unsubscribe@example.com")
    base.update(over)
    return MessageParts(**base)  # type: ignore[arg-type]


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_campaign_message_structure_and_headers() -> None:
    out = build_message(parts())
    msg = parse(out.mime)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg.get_body(("plain",)).get_content().strip() == "Héllo"  # type: ignore[union-attr]
    assert msg.get_body(("html",)).get_content().strip() == "<p>Héllo</p>"  # type: ignore[union-attr]
    assert msg["From"] == "Example <hello@example.com>"
    assert msg["Reply-To"] == "Support <support@example.com>"
    assert msg["Message-ID"] == "<7.abc@example.com>"
    assert msg["Date"] == "Fri, 02 Jan 2026 03:04:05 +0000"
    assert msg["List-Unsubscribe"] == ("<https://mail.example.com/u/TOKEN>, "
                                       "<mailto:unsubscribe@example.com?subject=unsubscribe%20TOKEN>")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Precedence"] == "bulk"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert out.headers[0][0] == "List-Unsubscribe"
    assert (out.kind, out.marketing) == ("campaign", True)


@pytest.mark.parametrize("kind", ["transaction", "test"])
def test_non_marketing_messages_have_no_list_unsubscribe(kind: str) -> None:
    msg = parse(build_message(parts(kind=kind)).mime)
    assert msg["List-Unsubscribe"] is None
    assert msg["List-Unsubscribe-Post"] is None
    assert msg["Precedence"] is None
    assert msg["Auto-Submitted"] is None


@pytest.mark.parametrize("subject", [
    "Hi\r\nBcc: victim@example.net", "Hi\nBcc: victim@example.net",
    "Hi\rBcc: victim@example.net", "Hi\r\n\r\n<html>body injection",
])
def test_line_breaks_in_the_subject_cannot_add_headers(subject: str) -> None:
    raw = build_message(parts(subject=subject)).mime
    msg = parse(raw)
    assert msg["Bcc"] is None
    assert "\n" not in msg["Subject"]
    assert "\r" not in msg["Subject"]
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    names = [line.split(":", 1)[0] for line in head.split("\r\n") if not line[:1].isspace()]
    assert names == ["From", "To", "Reply-To", "Subject", "Date", "Message-ID",
                     "List-Unsubscribe", "List-Unsubscribe-Post", "Precedence",
                     "Auto-Submitted", "MIME-Version", "Content-Type"]


@pytest.mark.parametrize("address", [
    "ann@example.org\r\nBcc: victim@example.net", "ann@example.org\nBcc: v@example.net",
    "a@example.org, b@example.org", "not an address", "", "Ann <>",
])
def test_bad_recipients_are_refused(address: str) -> None:
    with pytest.raises(InvalidAddress):
        build_message(parts(to=address))


def test_display_names_with_line_breaks_are_refused_not_folded_into_headers() -> None:
    with pytest.raises(InvalidAddress, match="line break"):
        parse_address("Eve\r\nBcc: v@example.net <eve@example.org>", "recipient")
    assert str(parse_address('"Doe, Jane" <jane@example.org>', "recipient")) == \
        '"Doe, Jane" <jane@example.org>'


def test_non_ascii_subject_and_names_are_encoded_and_parse_back() -> None:
    out = build_message(parts(subject="Héllo 🎉 " + "long words " * 20,
                              to="Zoë Ångström <zoe@example.org>", html="<p>" + "é" * 300))
    raw = out.mime
    assert raw.isascii()  # 7-bit clean: RFC 2047 headers, quoted-printable bodies
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    msg = parse(raw)
    assert msg["Subject"] == "Héllo 🎉 " + ("long words " * 20).strip()
    assert msg["To"].addresses[0].display_name == "Zoë Ångström"
    assert msg.get_body(("html",)).get_content() == "<p>" + "é" * 300  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", ["ann@example.org", "ann.lee+x@mail.example.co.uk",
                                 "o'neil@e.com", "A@B", "x_y-z@ex-ample.com"])
def test_a_bare_address_parses_as_the_stdlib_parses_it(raw: str) -> None:
    """The fast path for plain recipients builds the Address the general path would."""
    from email.headerregistry import Address

    fast, general = parse_address(raw, "recipient"), Address(addr_spec=raw)
    assert (fast.username, fast.domain, fast.addr_spec, fast.display_name, str(fast)) == (
        general.username, general.domain, general.addr_spec, general.display_name,
        str(general))


@pytest.mark.parametrize("raw", ["ann@@example.org", "ann@example..org", "a b@example.org",
                                 "ann@example.org\r\nBcc: x@y.z", "ann@"])
def test_malformed_bare_addresses_are_still_refused(raw: str) -> None:
    with pytest.raises(InvalidAddress):
        parse_address(raw, "recipient")


def test_ascii_parts_go_7bit_and_others_quoted_printable_and_both_parse_back() -> None:
    long_line = "<p>" + "x" * 1200 + "</p>"
    for html, text, cte in [("<p a=\"1\">Hello = there</p>", "Hello", "7bit"),
                            ("<p>Héllo</p>", "Héllo", "quoted-printable"),
                            (long_line, "long", "quoted-printable")]:
        msg = parse(build_message(parts(html=html, text=text)).mime)
        body = msg.get_body(("html",))
        assert body is not None
        assert body["Content-Transfer-Encoding"] == cte
        assert body.get_content().replace("\r\n", "\n").rstrip("\n") == html
        assert all(len(line) <= 998 for line in build_message(
            parts(html=html, text=text)).mime.split(b"\r\n"))


def test_a_body_holding_the_boundary_is_quoted_printable() -> None:
    out = build_message(parts(html="<p>x</p>"))
    boundary = out.mime.split(b'boundary="', 1)[1].split(b'"', 1)[0].decode()
    html = f"<p>--{boundary}--</p>"
    from segflowd.delivery.mime import _body

    assert _body(html, boundary)[0] == "quoted-printable"
    assert _body(html, boundary)[1].count(boundary.encode()) == 0


def test_one_click_unsubscribe_only_with_an_https_url() -> None:
    """RFC 8058: List-Unsubscribe-Post needs an HTTPS List-Unsubscribe URL; over http://
    the header would promise a one-click POST that mail providers refuse to make."""
    msg = parse(build_message(parts(unsubscribe_url="http://127.0.0.1:8787/u/TOKEN")).mime)
    assert msg["List-Unsubscribe"].startswith("<http://127.0.0.1:8787/u/TOKEN>")
    assert msg["List-Unsubscribe-Post"] is None
