"""Frequency caps: how many marketing messages one user may get per channel and window.

``[email] max_marketing = "3/day, 10/week"`` (and the same key of ``[sms]``) lists caps,
comma-separated, each ``N/hour``, ``N/day`` or ``N/week``. Windows are rolling: "3/day"
means at most three in any 24 hours, not three per calendar day, so a cap never depends
on a time zone and never lets a burst through at midnight.

This module only reads the text; the delivery gate that applies it is
:mod:`segflowd.delivery.capgate`, and the config check (a malformed string is a
:class:`~segflowd.errors.ConfigError` naming its key) is in :mod:`segflowd.configmail` and
:mod:`segflowd.configchannels`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

__all__ = ["CAP_ACTIONS", "WINDOWS", "Cap", "check_cap_action", "parse_caps"]

# The windows a cap may name, each rolling: the last hour, 24 hours or 7 days.
WINDOWS: dict[str, dt.timedelta] = {
    "hour": dt.timedelta(hours=1),
    "day": dt.timedelta(days=1),
    "week": dt.timedelta(days=7),
}
# What happens to a message over a cap: held until the cap allows it, or never sent.
CAP_ACTIONS = ("defer", "drop")

_CAP = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")
_EXAMPLE = 'e.g. "3/day, 10/week"'


@dataclasses.dataclass(frozen=True)
class Cap:
    """At most ``limit`` messages in any ``window``; ``text`` is how errors name it."""

    limit: int
    window: dt.timedelta
    text: str  # "3/day"


def parse_caps(text: str) -> tuple[Cap, ...]:
    """``"3/day, 10/week"`` → two :class:`Cap`; ``()`` for ""; ValueError when malformed.

    Each window may appear once (two caps on one window are a typo, not a policy), and a
    limit is at least 1: a deferred message must have a time it may go out at.
    """
    if not text.strip():
        return ()
    caps: list[Cap] = []
    seen: set[str] = set()
    for part in text.split(","):
        m = _CAP.match(part.lower())
        if m is None:
            raise ValueError(f"{part.strip()!r} is not a cap: write N/hour, N/day or N/week, "
                             f"comma-separated ({_EXAMPLE})")
        count, unit = int(m.group(1)), m.group(2)
        if unit not in WINDOWS:
            known = ", ".join(WINDOWS)
            raise ValueError(f"{part.strip()!r}: unknown window {unit!r} (known: {known})")
        if count < 1:
            raise ValueError(f"{part.strip()!r}: the limit must be at least 1 (to send no "
                             "marketing on a channel, leave its campaigns out of it)")
        if unit in seen:
            raise ValueError(f"{text.strip()!r} caps the {unit} twice: keep one")
        seen.add(unit)
        caps.append(Cap(count, WINDOWS[unit], f"{count}/{unit}"))
    return tuple(caps)


def check_cap_action(action: str) -> None:
    """ValueError unless ``action`` is one of :data:`CAP_ACTIONS`."""
    if action not in CAP_ACTIONS:
        known = " or ".join(f'"{a}"' for a in CAP_ACTIONS)
        raise ValueError(f"must be {known}, not {action!r}")
