"""How an SMS text is encoded and how many segments (billed parts) it takes.

An SMS carries 140 bytes. A text made only of characters of the GSM 03.38 alphabet
(3GPP TS 23.038: the basic table, plus the extension table reached through an escape)
is sent as GSM-7, seven bits a character: 160 septets fit one SMS. Any other character
makes the whole text UCS-2 (UTF-16 in practice): 70 code units fit one SMS. A longer text
is split into concatenated parts, each of which gives up room to a User Data Header:
153 septets or 67 code units per part. Providers bill per part, so this is what a
preview shows and what a cost estimate multiplies.

Counting follows what carriers and providers count:

* a GSM-7 extension character (``€ [ ] { } ^ ~ | \\`` and form feed) is an escape plus
  a character: 2 septets, and the pair is never split between two parts (a part that
  has room for only one more septet ends there);
* in UCS-2 a character outside the Basic Multilingual Plane (most emoji) is a surrogate
  pair: 2 code units, and the pair is never split between two parts either;
* ``Ç`` (0x09 of the basic table) is the capital letter as the standard draws it; ``ç``
  is not in the alphabet and makes the text UCS-2 (some providers substitute it, which
  this module does not assume);
* the empty text is 1 segment of 0 characters: what is sent (and billed) for a message
  with no body is one SMS. Providers that refuse an empty body (Twilio: 21602) refuse it
  before counting.

Nothing here substitutes characters (smart quotes for plain ones, ...): a text is
counted as it will be sent.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["GSM7_BASIC", "GSM7_EXTENSION", "SmsEncoding", "SmsParts", "is_gsm7",
           "sms_parts"]

SmsEncoding = Literal["GSM-7", "UCS-2"]

# The GSM 03.38 basic table, in code order (0x1B, the escape, left out: it is no character).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ" "ÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
# The extension table: each is sent as escape + character, 2 septets.
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

GSM7_SINGLE = 160  # septets in one SMS
GSM7_PART = 153  # septets per part of a concatenated SMS (7 go to the header)
UCS2_SINGLE = 70  # UTF-16 code units in one SMS
UCS2_PART = 67  # code units per part of a concatenated SMS


@dataclasses.dataclass(frozen=True)
class SmsParts:
    """A text's encoding, its length as billed (septets for GSM-7, UTF-16 code units
    for UCS-2) and how many SMS it is sent as."""

    encoding: SmsEncoding
    characters: int
    segments: int


def is_gsm7(text: str) -> bool:
    """Whether every character of ``text`` is in the GSM-7 alphabet (basic or extension)."""
    return all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text)


def sms_parts(text: str) -> SmsParts:
    """The encoding, billed length and segment count of ``text`` (see the module's rules)."""
    if is_gsm7(text):
        costs = [2 if c in GSM7_EXTENSION else 1 for c in text]
        return SmsParts("GSM-7", sum(costs), _segments(costs, GSM7_SINGLE, GSM7_PART))
    costs = [2 if ord(c) > 0xFFFF else 1 for c in text]
    return SmsParts("UCS-2", sum(costs), _segments(costs, UCS2_SINGLE, UCS2_PART))


def _segments(costs: list[int], single: int, part: int) -> int:
    """How many parts: one when the whole fits ``single``, else parts of at most ``part``
    units filled in order, a character of 2 units never split across two."""
    if sum(costs) <= single:
        return 1
    parts, used = 1, 0
    for cost in costs:
        if used + cost > part:
            parts, used = parts + 1, 0
        used += cost
    return parts
