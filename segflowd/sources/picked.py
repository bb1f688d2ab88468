"""Picked audiences: a data source's audience for values chosen at run time (pick-and-send).

A marketer picks a discovery row (a community) and sends to its audience without a code
change: ``segflowd broadcast --data-source communities --values community_id=42 ...``.
The audience is synced like a declared audience segment, under a generated name that
records everything needed to find it again after a restart:

    ``communities:{"community_id":42}``

the data source's name, a colon, and the values as canonical JSON (sorted keys, no
spaces). The same pick always gives the same name; the name is what ``audience_members``
and ``broadcasts.segment`` store, so the preload (template ``profile``) and a resumed
broadcast read the data source and its typed values back from it (:func:`parse_name`).

Values keep their types. On the command line each ``KEY=VALUE`` is read as JSON when it
parses as a JSON number, ``true``/``false``, ``null`` or a ``"quoted string"``, and as
plain text otherwise (:func:`parse_value`): ``community_id=42`` binds the integer 42, and
``code='"42"'`` the text ``"42"``. A value that starts like a JSON array or object is
an error: it would not bind as one value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from ..sourcedefs import DataSourceDef

__all__ = ["NAME_LIMIT", "PickError", "check_values", "parse_name", "parse_pairs",
           "parse_value", "picked_name"]

NAME_LIMIT = 191  # characters of a segment / audience name (schema.Name)
SEPARATOR = ":"


class PickError(ValueError):
    """A pick that cannot be used: a bad ``KEY=VALUE``, an unknown placeholder, too long."""


def parse_value(text: str) -> object:
    """``text`` as a typed value: JSON when it parses as a scalar, else the text itself."""
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        raise PickError(f"{text!r} looks like a JSON array or object; a placeholder takes "
                        "one value (a number, text, true, false or null)")
    try:
        value = json.loads(stripped)
    except ValueError:
        return text
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return text  # NaN / Infinity: not numbers a placeholder should get
    return value


def parse_pairs(pairs: Iterable[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs as typed values (:func:`parse_value`); PickError for a bad pair."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PickError(f"--values wants KEY=VALUE, got {pair!r}")
        if key in out:
            raise PickError(f"--values gives {key!r} twice")
        try:
            out[key] = parse_value(raw)
        except PickError as exc:
            raise PickError(f"--values {key}: {exc}") from None
    return out


def check_values(d: DataSourceDef, values: Mapping[str, object]) -> None:
    """PickError unless ``values`` give exactly the audience query's placeholders, each
    one JSON scalar."""
    used = set(d.audience.names)
    for key, value in values.items():
        if key not in used:
            known = ", ".join(d.audience.names) or "none"
            raise PickError(f"the audience query of data source {d.name!r} has no "
                            f"placeholder {key!r} (its placeholders: {known})")
        if not (value is None or isinstance(value, str | int | float | bool)):
            raise PickError(f"value of {key!r} must be a number, text, true, false or null")
    missing = d.audience.missing(values)
    if missing:
        raise PickError(f"the audience query of data source {d.name!r} uses "
                        f"<%= {missing[0]} %>: give it with --values {missing[0]}=VALUE")


def picked_name(data_source: str, values: Mapping[str, object]) -> str:
    """The generated audience segment of a pick (deterministic; PickError if too long)."""
    name = data_source + SEPARATOR + json.dumps(dict(values), sort_keys=True,
                                                separators=(",", ":"), ensure_ascii=False)
    if len(name) > NAME_LIMIT:
        raise PickError(f"the values are too long for an audience name ({len(name)} > "
                        f"{NAME_LIMIT} characters of data source and values as JSON)")
    return name


def parse_name(name: str, data_sources: Mapping[str, DataSourceDef]
               ) -> tuple[str, dict[str, object]] | None:
    """The (data source, values) a generated name records; None for any other name."""
    head, sep, tail = name.partition(SEPARATOR)
    if not sep or head not in data_sources or not tail.startswith("{"):
        return None
    try:
        values = json.loads(tail)
    except ValueError:
        return None
    if not isinstance(values, dict):
        return None
    try:
        canonical = picked_name(head, values)
    except PickError:
        return None
    return (head, values) if canonical == name else None  # only the canonical form
