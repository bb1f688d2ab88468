"""DirectFlow placeholders: ``<%= name %>`` in SQL, always a bound parameter, never text.

A placeholder may be written bare (``WHERE id = <%= profile_id %>``) or quoted the way
DirectFlow's documentation writes it (``WHERE id = '<%= profile_id %>'``); either way
the quotes go and the value is bound, so a value such as ``x' OR '1'='1`` is compared as
the plain string it is. Every other colon of the SQL is escaped, so PostgreSQL casts
(``::boolean``) and literals like ``'10:30'`` keep their meaning.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.types import NullType

from .errors import PlaceholderError

__all__ = ["Placeholders", "parse"]

# A quoted placeholder ('<%= x %>') loses its quotes; a bare one is replaced as it is.
_PLACEHOLDER = re.compile(r"'\s*<%=\s*(\w+)\s*%>\s*'|<%=\s*(\w+)\s*%>")
_MALFORMED = re.compile(r"<%(?!=\s*\w+\s*%>)")
_BIND_PREFIX = "ph_"  # bind names are prefixed so they never meet a name in the SQL text
_QUOTED_PREFIX = "phq_"  # a quoted placeholder binds its value as text, as the literal was


@dataclasses.dataclass(frozen=True)
class Placeholders:
    """A SQL text with its placeholders found: ``names`` in order of first use."""

    sql: str
    names: tuple[str, ...]
    _text: str  # the SQL for sa.text(): binds for placeholders, other colons escaped
    _binds: tuple[tuple[str, str, bool], ...]  # (bind name, placeholder, quoted)

    def missing(self, known: Iterable[str]) -> list[str]:
        """The placeholders not among ``known`` (for checks before any query runs)."""
        have = set(known)
        return [n for n in self.names if n not in have]

    def bind(self, values: Mapping[str, object], *, source: str, what: str) -> TextClause:
        """The statement with every placeholder bound; PlaceholderError naming a missing one.

        ``source`` and ``what`` ("audience query of data source 'crm'") go in the message.
        Values not used by the SQL are ignored: a flow may pass more than one query needs.
        """
        absent = [n for n in self.names if n not in values]
        if absent:
            given = ", ".join(sorted(values)) or "none"
            raise PlaceholderError(
                source, f"{what}: no value for placeholder <%= {absent[0]} %> "
                f"(values given: {given})")
        stmt = sa.text(self._text)
        if self._binds:
            # Untyped binds: the database infers each parameter's type from where it
            # stands, as it would for the literal DirectFlow pasted there.
            stmt = stmt.bindparams(*[
                sa.bindparam(bind, _plain(values[n], quoted), type_=NullType())
                for bind, n, quoted in self._binds])
        return stmt


def parse(sql: str) -> Placeholders:
    """Find the placeholders of ``sql``; ValueError on a malformed ``<% ... %>``."""
    if not isinstance(sql, str) or not sql.strip():
        raise ValueError("the SQL must be a non-empty string")
    names: list[str] = []
    binds: dict[str, tuple[str, str, bool]] = {}
    parts: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(sql):
        parts.append(_escape(sql[pos:m.start()]))
        quoted = m.group(1) is not None
        name = m.group(1) or m.group(2)
        if name not in names:
            names.append(name)
        bind = (_QUOTED_PREFIX if quoted else _BIND_PREFIX) + name
        binds.setdefault(bind, (bind, name, quoted))
        # a bind right after a word character would not be read as one by sa.text()
        sep = " " if parts[-1][-1:].isalnum() or parts[-1][-1:] == "_" else ""
        parts.append(sep + ":" + bind)
        pos = m.end()
    parts.append(_escape(sql[pos:]))
    leftover = _PLACEHOLDER.sub("", sql)
    bad = _MALFORMED.search(leftover)
    if bad:
        snippet = leftover[bad.start():bad.start() + 30]
        raise ValueError(f"malformed placeholder near {snippet!r}: write <%= name %>")
    return Placeholders(sql=sql, names=tuple(names), _text="".join(parts),
                        _binds=tuple(binds.values()))


def _escape(chunk: str) -> str:
    # sa.text() reads ":word" as a bind; the SQL's own colons are literal.
    return chunk.replace(":", "\\:")


def _plain(value: object, quoted: bool) -> object:
    # Values come from discovery rows, flow code or user ids. A quoted placeholder was a
    # string literal in DirectFlow, so its value is bound as text; a bare one keeps its
    # type. Anything else is its text (a list or dict has no meaning as one SQL value).
    if quoted and value is not None:
        return value if isinstance(value, str) else str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    import datetime as dt
    import decimal
    import uuid

    if isinstance(value, dt.date | dt.datetime | dt.time | decimal.Decimal | uuid.UUID):
        return value
    return str(value)
