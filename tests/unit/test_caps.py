"""Frequency cap strings (segflowd.caps) and the config keys that hold them: what parses,
and bad input refused with a ConfigError naming the key and its line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from segflowd.caps import Cap, check_cap_action, parse_caps
from segflowd.config import load_config
from segflowd.errors import ConfigError

MINIMAL = """\
[daemon]
app = "app.py:app"

[providers.outbox]
plugin = "outbox"

[providers.sms]
plugin = "twilio"
"""


def test_caps_parse_with_rolling_windows() -> None:
    assert parse_caps("3/day, 10/week") == (
        Cap(3, dt.timedelta(days=1), "3/day"), Cap(10, dt.timedelta(days=7), "10/week"))
    assert parse_caps(" 1 / HOUR ") == (Cap(1, dt.timedelta(hours=1), "1/hour"),)


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_string_is_no_cap(text: str) -> None:
    assert parse_caps(text) == ()


@pytest.mark.parametrize(("text", "says"), [
    ("3", "is not a cap"),
    ("3/day,", "is not a cap"),
    ("three/day", "is not a cap"),
    ("-1/day", "is not a cap"),
    ("3/month", "unknown window 'month'"),
    ("3/days", "unknown window 'days'"),
    ("0/day", "at least 1"),
    ("3/day, 5/day", "caps the day twice"),
    ("3/day; 10/week", "is not a cap"),
])
def test_malformed_caps_are_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_caps(text)


def test_only_defer_and_drop_are_actions() -> None:
    check_cap_action("defer")
    check_cap_action("drop")
    with pytest.raises(ValueError, match='must be "defer" or "drop"'):
        check_cap_action("skip")


def test_config_reads_the_caps_of_email_and_sms(tmp_path: Path) -> None:
    path = tmp_path / "segflow.toml"
    path.write_text(MINIMAL + '[email]\nmax_marketing = "3/day, 10/week"\n'
                    '[sms]\nprovider = "sms"\nmax_marketing = "1/day"\ncap_action = "drop"\n')
    c = load_config(path, {})
    assert (c.email.max_marketing, c.email.cap_action) == ("3/day, 10/week", "defer")
    assert (c.sms.max_marketing, c.sms.cap_action) == ("1/day", "drop")


@pytest.mark.parametrize(("section", "key", "value", "says"), [
    ("email", "max_marketing", "3/fortnight", "unknown window"),
    ("email", "cap_action", "skip", "must be"),
    ("sms", "max_marketing", "3 per day", "is not a cap"),
    ("sms", "cap_action", "later", "must be"),
])
def test_bad_cap_config_names_the_key_and_line(tmp_path: Path, section: str, key: str,
                                               value: str, says: str) -> None:
    path = tmp_path / "segflow.toml"
    path.write_text(MINIMAL + f'[{section}]\n{key} = "{value}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.key == f"{section}.{key}"
    assert info.value.line == MINIMAL.count("\n") + 2
    assert says in str(info.value)
