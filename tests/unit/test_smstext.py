"""SMS encoding and segment counts, checked against known examples (3GPP TS 23.038)."""

from __future__ import annotations

import pytest

from segflowd.smstext import GSM7_BASIC, GSM7_EXTENSION, SmsParts, is_gsm7, sms_parts


def test_the_gsm7_tables_have_their_standard_sizes() -> None:
    assert len(GSM7_BASIC) == 127  # 128 codes less the escape
    assert len(GSM7_EXTENSION) == 10
    assert not GSM7_BASIC & GSM7_EXTENSION


@pytest.mark.parametrize(("text", "expected"), [
    ("a" * 160, SmsParts("GSM-7", 160, 1)),
    ("a" * 161, SmsParts("GSM-7", 161, 2)),
    ("a" * 306, SmsParts("GSM-7", 306, 2)),  # 153 * 2
    ("a" * 307, SmsParts("GSM-7", 307, 3)),
    ("a" * 459, SmsParts("GSM-7", 459, 3)),  # 153 * 3
    ("é" * 70 + "ü@£$¥Ñ\n", SmsParts("GSM-7", 77, 1)),  # accented letters of the basic table
    ("€", SmsParts("GSM-7", 2, 1)),
    ("[]{}^~|\\€\f", SmsParts("GSM-7", 20, 1)),
    ("€" * 80, SmsParts("GSM-7", 160, 1)),
    ("€" * 80 + "a", SmsParts("GSM-7", 161, 2)),
    ("ж" * 70, SmsParts("UCS-2", 70, 1)),
    ("ж" * 71, SmsParts("UCS-2", 71, 2)),
    ("ж" * 134, SmsParts("UCS-2", 134, 2)),  # 67 * 2
    ("ж" * 135, SmsParts("UCS-2", 135, 3)),
    ("a" * 69 + "ж", SmsParts("UCS-2", 70, 1)),  # one character outside GSM-7: all UCS-2
    ("😀", SmsParts("UCS-2", 2, 1)),  # a surrogate pair: 2 code units
    ("😀" * 35, SmsParts("UCS-2", 70, 1)),
    ("😀" * 36, SmsParts("UCS-2", 72, 2)),
    ("ç", SmsParts("UCS-2", 1, 1)),  # only the capital Ç is in the basic table
    ("Ç", SmsParts("GSM-7", 1, 1)),
    ("\u2019", SmsParts("UCS-2", 1, 1)),  # a typographic apostrophe is not GSM-7
])
def test_known_examples(text: str, expected: SmsParts) -> None:
    assert sms_parts(text) == expected


def test_the_empty_text_is_one_segment_of_nothing() -> None:
    assert sms_parts("") == SmsParts("GSM-7", 0, 1)


def test_an_extension_character_is_never_split_across_parts() -> None:
    # 152 plain septets then "€" (2): 154 septets. Whole, 2 parts; the first part ends
    # after 152 because the escape pair does not fit its last septet.
    assert sms_parts("a" * 152 + "€" + "a" * 7).segments == 2  # 161 septets: 152 | 2+7
    # 152 + € + 152: naive septet counting says 306 = 2 parts of 153; the pair moves to
    # part two, which then holds 2 + 152 = 154 > 153, so it takes 3.
    text = "a" * 152 + "€" + "a" * 152
    assert sms_parts(text) == SmsParts("GSM-7", 306, 3)
    # The same length with the € where it fits a part boundary: 2 parts.
    assert sms_parts("a" * 151 + "€" + "a" * 153).segments == 2


def test_a_surrogate_pair_is_never_split_across_parts() -> None:
    text = "ж" * 66 + "😀" + "ж" * 66  # 134 code units: naively 2 parts of 67
    assert sms_parts(text) == SmsParts("UCS-2", 134, 3)
    assert sms_parts("ж" * 65 + "😀" + "ж" * 67).segments == 2


def test_is_gsm7() -> None:
    assert is_gsm7("Hello {name}, 50% off €10! @you")
    assert not is_gsm7("Hello 👋")
    assert is_gsm7("")
