"""Building the RFC 5322 message: multipart/alternative, Message-ID, Date, From/Reply-To.

Campaign and broadcast messages carry ``List-Unsubscribe`` (URL, and mailto where
configured) and, when that URL is https, ``List-Unsubscribe-Post:
List-Unsubscribe=One-Click`` (RFC 8058), and ``Precedence: bulk`` with ``Auto-Submitted:
auto-generated`` (no auto-replies, RFC 3834); transactional and test messages do not.

No header injection: every value that came from data (subject, names, addresses) is
folded to one line first, and an address that still does not parse as exactly one
address is refused with :class:`InvalidAddress`; the stdlib's header policy then
refuses any CR/LF that might be left, so no value can ever start a header of its own.
Control characters (NUL, BEL, ESC, DEL, the C1 range) are dropped from the subject and
display names, and a value that holds ``=?`` goes out as an RFC 2047 encoded-word
itself, so a reader shows the text the data held instead of decoding it.

Addresses: an internationalised domain (``x@bücher.example``) goes out in its ASCII form
(IDNA 2008 with the UTS #46 mapping: ``x@xn--bcher-kva.example``). A non-ASCII local part
would need SMTPUTF8, which Segflow does not use: such an address is refused with
:class:`InvalidAddress`, so that one message fails and nothing else.

Line lengths: no header line is longer than the 998 octets RFC 5322 2.1.1 allows. A
header that would be is folded at its spaces into lines of at most 78 characters; a
non-ASCII (or ``=?``) subject goes as RFC 2047 encoded-words of at most 66 characters
each, so a long one folds too, and so does an ASCII one holding a word too long for a
line.
"""

from __future__ import annotations

import binascii
import dataclasses
import datetime as dt
import email.errors
import email.header
import email.utils
import functools
import re
import secrets
from email.headerregistry import Address

import idna

from ..providers import MARKETING_KINDS, OutgoingMessage

__all__ = [
    "InvalidAddress", "InvalidMessage", "MessageParts", "ascii_domain", "build_message",
    "header_text", "make_message_id", "one_line", "parse_address",
]



class InvalidMessage(ValueError):
    """A message cannot be built as it is (its text says why); that message alone fails."""


class InvalidAddress(InvalidMessage):
    """An address (recipient, From, Reply-To) is not one valid email address."""


def one_line(value: str) -> str:
    """Fold every run of whitespace (CR and LF included) into one space."""
    return " ".join(str(value).split())


# C0 controls, DEL and C1 controls that are not whitespace: dropped from header text.
# The whitespace ones (TAB, CR, LF, FS..US, NEL) are folded into a space instead.
_DROP_CONTROLS = {c: None for c in (*range(0x20), *range(0x7F, 0xA0)) if not chr(c).isspace()}


def header_text(value: str) -> str:
    """``value`` as one line of header text: whitespace runs folded into one space and
    control characters (NUL, BEL, ESC, DEL, ...) dropped, so none reaches a reader."""
    return " ".join(str(value).translate(_DROP_CONTROLS).split())


# A bare dot-atom address (``ann.lee+x@mail.example.com``): what nearly every recipient
# is, and valid as it stands, so it needs none of the stdlib's general parsing.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_BARE_ADDRESS = re.compile(rf"({_ATEXT}(?:\.{_ATEXT})*)@({_LABEL}(?:\.{_LABEL})*)")
ADDRESS_CACHE = 4096  # addresses; the From, Reply-To and a batch's recipients repeat


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def parse_address(value: str, what: str) -> Address:
    """Exactly one address, or :class:`InvalidAddress` saying what is wrong."""
    raw = str(value)
    bare = _BARE_ADDRESS.fullmatch(raw)
    if bare is not None:  # the same Address the general path builds, without parsing
        return Address(username=bare.group(1), domain=bare.group(2))
    if "\r" in raw or "\n" in raw or "\0" in raw:
        raise InvalidAddress(f"{what} {raw!r} contains a line break")
    pairs = email.utils.getaddresses([raw])
    if len(pairs) != 1 or not pairs[0][1] or "@" not in pairs[0][1]:
        raise InvalidAddress(f"{what} {raw!r} is not one email address")
    name, addr = pairs[0]
    local, _, domain = addr.rpartition("@")
    if not local or not domain or " " in addr or "," in addr:
        raise InvalidAddress(f"{what} {raw!r} is not one email address")
    if not local.isascii():
        raise InvalidAddress(
            f"{what} {raw!r} has a non-ASCII local part (before the @), which needs SMTPUTF8;"
            " Segflow sends only ASCII addresses")
    try:
        parsed = Address(display_name=header_text(name), addr_spec=addr)
    except (ValueError, IndexError, email.errors.HeaderParseError) as exc:
        raise InvalidAddress(f"{what} {raw!r} is not valid: {exc}") from None
    if parsed.domain.isascii():
        return parsed
    return Address(display_name=parsed.display_name, username=parsed.username,
                   domain=ascii_domain(parsed.domain, f"{what} {raw!r}"))


def ascii_domain(domain: str, where: str = "domain") -> str:
    """``domain`` in ASCII: an internationalised name as IDNA A-labels
    (``bücher.example`` → ``xn--bcher-kva.example``), or :class:`InvalidAddress`."""
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError as exc:  # a UnicodeError: never let it escape as one
        raise InvalidAddress(
            f"{where}: the domain {domain!r} is not a valid internationalised domain name "
            f"({exc})") from None


def domain_of(sender: str) -> str:
    try:
        return parse_address(sender, "sender").domain or "localhost"
    except InvalidAddress:
        return "localhost"


def make_message_id(row_id: int, domain: str) -> str:
    """A globally unique Message-ID (without angle brackets) for outbox row ``row_id``."""
    return f"{row_id}.{secrets.token_hex(8)}@{domain}"


@dataclasses.dataclass(frozen=True)
class MessageParts:
    """What one message is made of, before it is made into MIME."""

    row_id: int
    kind: str  # campaign | transaction | test | broadcast
    sender: str
    to: str
    subject: str
    html: str
    text: str
    message_id: str
    date: dt.datetime  # naive UTC
    reply_to: str = ""
    unsubscribe_url: str = ""
    unsubscribe_mailto: str = ""  # an address; the token goes in its subject


MAX_LINE = 998  # octets per line, CRLF excluded (RFC 5322 2.1.1)
FOLD_AT = 78  # characters per header line where the value has spaces to fold at
# Characters per RFC 2047 encoded-word (at most 75, RFC 2047 2): short enough that
# "Subject: " and one word fit the 78 of a line.
ENCODED_WORD = 66
LONG_WORD = 900  # characters: an ASCII word longer than this goes as encoded-words


def _encoded_words(value: str, width: int = ENCODED_WORD) -> str:
    """``value`` as RFC 2047 encoded-words of at most ``width`` characters, one space
    apart.

    The stdlib splits a long value between characters, never inside one; the spaces
    between encoded-words are where :func:`_fold` may break the line (a reader drops
    them when decoding, RFC 2047 6.2).
    """
    encoded = email.header.Header(value, "utf-8", maxlinelen=width + 1).encode()
    return " ".join(encoded.split())


def _needs_encoding(value: str) -> bool:
    """Whether a header value must go as encoded-words: not ASCII, holding ``=?``, or
    holding a word no line could carry."""
    if not value.isascii() or "=?" in value:
        return True
    return len(value) > LONG_WORD and max(map(len, value.split(" "))) > LONG_WORD


def _header_value(value: str) -> str:
    """A one-line header value, RFC 2047-encoded when it is not ASCII.

    An ASCII value holding ``=?`` is encoded too: sent as it is, a reader would decode
    an encoded-word written into the data (``=?utf-8?q?=0D=0A...?=``) and show text the
    template never rendered.
    """
    value = one_line(value)
    if not _needs_encoding(value):
        return value
    return _encoded_words(value)


def _address(a: Address) -> str:
    name = a.display_name
    if name and _needs_encoding(name):  # encoded-words read back as the text they hold
        # One word while it fits a line: in a display name (a phrase) the stdlib's parser
        # keeps the space between two encoded-words that RFC 2047 says to drop.
        return f"{_encoded_words(name, LONG_WORD)} <{a.addr_spec}>"
    return email.utils.formataddr((name, a.addr_spec), charset="utf-8")


def _fold(name: str, value: str) -> str:
    """``value`` (one line) as it goes after ``name:``: as it is when the line fits the
    998 octets RFC 5322 allows, else folded at its spaces into lines of at most
    :data:`FOLD_AT` characters where the words allow. Each fold is a CRLF put before a
    space, which unfolding removes again (RFC 5322 2.2.3); no word is longer than
    :data:`LONG_WORD` (longer ones went as encoded-words), so no line passes 998.

    Headers that fit stay on one line, as every ordinary header does: a continuation
    line is then never something a data value brought in.
    """
    if len(name) + 2 + len(value) <= MAX_LINE:
        return value
    lines: list[str] = []
    line = ""
    width = len(name) + 2
    for word in value.split(" "):
        if line and width + 1 + len(word) > FOLD_AT:
            lines.append(line)
            line, width = word, 1 + len(word)
        elif line:
            line, width = f"{line} {word}", width + 1 + len(word)
        else:
            line, width = word, width + len(word)
    lines.append(line)
    return "\r\n ".join(lines)


def _body(text: str, boundary: str) -> tuple[str, bytes]:
    """A part's Content-Transfer-Encoding and body, with CRLF line ends.

    ASCII text whose lines fit goes as ``7bit``, as it is (quoted-printable encoding
    costs as much as building the rest of the message); anything else is
    quoted-printable (lines of at most 76 characters, and never the boundary: in
    quoted-printable "=_" cannot occur).
    """
    raw = text.replace("\r\n", "\n").replace("\r", "\n")
    if (raw.isascii() and "\0" not in raw and boundary not in raw
            and (len(raw) <= MAX_LINE or max(map(len, raw.split("\n"))) <= MAX_LINE)):
        return "7bit", raw.encode("ascii").replace(b"\n", b"\r\n")
    qp = binascii.b2a_qp(raw.encode("utf-8"), quotetabs=False, istext=True)
    return "quoted-printable", qp.replace(b"\n", b"\r\n")


def build_message(p: MessageParts) -> OutgoingMessage:
    """The MIME message and its parts; :class:`InvalidAddress` for a bad address and
    :class:`InvalidMessage` for any other value that cannot go out.

    Written directly rather than through :class:`email.message.EmailMessage` (five times
    faster at send rates); every header value is one line by construction (folded at
    its spaces only past 998 octets, see :func:`_fold`) and the result parses back with
    the stdlib (the tests do).
    """
    sender = parse_address(p.sender, "From")
    to = parse_address(p.to, "recipient")
    reply_to = parse_address(p.reply_to, "Reply-To") if p.reply_to else None
    subject = header_text(p.subject)
    message_id = one_line(p.message_id)
    headers: list[tuple[str, str]] = [
        ("From", _address(sender)), ("To", _address(to))]
    if reply_to is not None:
        headers.append(("Reply-To", _address(reply_to)))
    headers += [("Subject", _header_value(subject)),
                ("Date", email.utils.format_datetime(p.date.replace(tzinfo=dt.UTC))),
                ("Message-ID", f"<{message_id}>")]
    extra: list[tuple[str, str]] = []
    if p.kind in MARKETING_KINDS and p.unsubscribe_url:
        targets = [f"<{one_line(p.unsubscribe_url)}>"]
        if p.unsubscribe_mailto:
            mailto = parse_address(p.unsubscribe_mailto, "unsubscribe_mailto").addr_spec
            token = p.unsubscribe_url.rstrip("/").rsplit("/", 1)[-1]
            targets.append(f"<mailto:{mailto}?subject=unsubscribe%20{one_line(token)}>")
        extra.append(("List-Unsubscribe", ", ".join(targets)))
        if p.unsubscribe_url.lower().startswith("https://"):  # RFC 8058 wants HTTPS
            extra.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
    if p.kind in MARKETING_KINDS:  # bulk mail: no auto-replies (RFC 3834), no vacation notes
        extra += [("Precedence", "bulk"), ("Auto-Submitted", "auto-generated")]
    boundary = f"=_segflow_{secrets.token_hex(12)}"
    headers += extra
    headers += [("MIME-Version", "1.0"),
                ("Content-Type", f'multipart/alternative; boundary="{boundary}"')]
    for name, value in headers:
        if "\r" in value or "\n" in value:  # unreachable by construction; never emit it
            raise InvalidAddress(f"header {name} would span lines")
        if not value.isascii():  # 8-bit headers need SMTPUTF8, which is not used
            raise InvalidMessage(f"header {name} holds non-ASCII text that cannot be sent: "
                                 f"{value[:80]!r}")
    head = "".join(f"{name}: {_fold(name, value)}\r\n" for name, value in headers
                   ).encode("ascii")
    b = boundary.encode()
    chunks = [head, b"\r\n"]
    for sub, content in (("plain", p.text or " "), ("html", p.html)):
        cte, body = _body(content, boundary)
        chunks += [b"--", b, b"\r\n",
                   f'Content-Type: text/{sub}; charset="utf-8"\r\n'
                   f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode(), body, b"\r\n"]
    chunks += [b"--", b, b"--\r\n"]
    mime = b"".join(chunks)
    return OutgoingMessage(
        id=p.row_id, message_id=message_id, sender=_address(sender), to=_address(to),
        subject=subject, mime=mime, html=p.html, text=p.text,
        reply_to=_address(reply_to) if reply_to is not None else "", headers=tuple(extra),
        kind=p.kind,
    )
