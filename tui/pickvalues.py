"""The pick-and-send screen's pure parts: a discovered row's values, and counting a
broadcast's messages (:mod:`segflow_tui.pick` shows them)."""

from __future__ import annotations

import datetime as dt
import json
import shlex
from collections.abc import Mapping, Sequence

from segflowd.sources.picked import PickError, parse_pairs, parse_value

from .render import value

__all__ = ["cell", "format_values", "guess_values", "message_counts", "parse_values",
           "table_rows"]

MAX_CELL = 40  # characters of a value shown in a table
PENDING = ("queued", "claimed", "sending")
FAILED = ("failed", "unknown")


def guess_values(row: Mapping[str, object], placeholders: Sequence[str]) -> dict[str, object]:
    """The placeholder values a discovery row stands for: the column of the same name;
    else, for ``X_id``, the row's ``id``; else, for a single placeholder, the first column.
    A placeholder without a scalar value is left out (the operator types it)."""
    out: dict[str, object] = {}
    first = next(iter(row), None)
    for name in placeholders:
        if name in row:
            found = row[name]
        elif name.endswith("_id") and "id" in row:
            found = row["id"]
        elif len(placeholders) == 1 and first is not None:
            found = row[first]
        else:
            continue
        if found is None or isinstance(found, str | int | float | bool):
            out[name] = found
    return out


def format_values(values: Mapping[str, object]) -> str:
    """Values as the ``KEY=VALUE`` words :func:`parse_values` reads back, types kept."""
    words = []
    for key, v in values.items():
        plain = isinstance(v, str) and _reads_as_text(v)
        words.append(shlex.quote(f"{key}={v if plain else json.dumps(v)}"))
    return " ".join(words)


def _reads_as_text(v: str) -> bool:
    try:
        return parse_value(v) == v
    except PickError:
        return False


def parse_values(text: str) -> dict[str, object]:
    """``KEY=VALUE`` words (shell quoting) as typed values; PickError says what is wrong."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise PickError(f"values: {exc}") from None
    return parse_pairs(words)


def message_counts(messages: object, launched: Mapping[str, object]) -> dict[str, int]:
    """The broadcast's messages by outcome (sent, queued, failed, suppressed), from a
    ``messages`` reply: broadcast messages of its template (or its campaign's messages)
    created since it was launched."""
    counts = {"sent": 0, "queued": 0, "failed": 0, "suppressed": 0}
    since = _when(launched.get("created_at"))
    template, campaign = launched.get("template"), launched.get("campaign")
    for m in messages if isinstance(messages, list) else []:
        if not isinstance(m, Mapping):
            continue
        if template is not None and (m.get("kind") != "broadcast"
                                     or m.get("template") != template):
            continue
        if campaign is not None and m.get("campaign") != campaign:
            continue
        created = _when(m.get("created_at"))
        if since is not None and (created is None or created < since):
            continue
        status = str(m.get("status"))
        key = "queued" if status in PENDING else "failed" if status in FAILED else status
        if key in counts:
            counts[key] += 1
    return counts


def _when(v: object) -> dt.datetime | None:
    """An ISO timestamp of the daemon's (naive UTC, with or without ``Z``) as naive UTC."""
    if not isinstance(v, str) or not v:
        return None
    try:
        t = dt.datetime.fromisoformat(v.removesuffix("Z"))
    except ValueError:
        return None
    return t.astimezone(dt.UTC).replace(tzinfo=None) if t.tzinfo else t


def cell(v: object) -> str:
    text = json.dumps(v, default=str) if isinstance(v, Mapping | list) else value(v)
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def table_rows(v: object) -> list[Mapping[str, object]]:
    return [r for r in v if isinstance(r, Mapping)] if isinstance(v, list) else []
