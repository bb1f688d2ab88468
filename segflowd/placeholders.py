"""DirectFlow placeholders: ``<%= name %>`` in SQL, always a bound parameter, never text.

A placeholder may stand where a value stands, in one of two ways:

* bare, as its own token: ``WHERE id = <%= profile_id %>``, ``CONCAT('%', <%= q %>, '%')``;
* as a whole quoted literal, the way DirectFlow's documentation writes it:
  ``WHERE id = '<%= profile_id %>'``. The quotes go and the value is bound, so a value
  such as ``x' OR '1'='1`` is compared as the plain string it is.

Anywhere else is an error when the app loads (and in ``segflowd check``): inside a longer
string literal (``LIKE '%<%= q %>%'``), a comment, a quoted identifier, a dollar-quoted
string, or glued to a following word (``<%= x %>abc``). A value spliced into such a place
would be SQL text, not a value. The SQL is also one statement: a ``;`` other than one at
the end is an error. The SQL is read with the lexical rules of its database (MySQL: ``\\``
escapes, backtick identifiers, ``#`` comments; PostgreSQL: ``$tag$`` strings, nested
``/* */`` comments); with no dialect given, it must pass under both.

Every other colon of the SQL is escaped, so PostgreSQL casts (``::boolean``) and literals
like ``'10:30'`` keep their meaning.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.types import NullType

from .errors import PlaceholderError

__all__ = ["Dialect", "Placeholders", "parse"]

Dialect = Literal["mysql", "postgresql"]

_TAG = re.compile(r"<%=\s*(\w+)\s*%>")
_QUOTED = re.compile(r"'\s*<%=\s*(\w+)\s*%>\s*'")
_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_BIND_PREFIX = "ph_"  # bind names are prefixed so they never meet a name in the SQL text
_QUOTED_PREFIX = "phq_"  # a quoted placeholder binds its value as text, as the literal was
_HINT = {
    "mysql": "CONCAT('%', <%= {n} %>, '%')",
    "postgresql": "'%' || <%= {n} %> || '%'",
}


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


def parse(sql: str, dialect: Dialect | None = None) -> Placeholders:
    """Find the placeholders of ``sql``; ValueError saying what is wrong and where.

    ``dialect`` is the source's database; None (the app, before the source is known)
    checks the SQL under the rules of both MySQL and PostgreSQL.
    """
    if not isinstance(sql, str) or not sql.strip():
        raise ValueError("the SQL must be a non-empty string")
    if dialect is None:
        _Scanner(sql, "mysql", both=True).run()
        return _Scanner(sql, "postgresql", both=True).run()
    return _Scanner(sql, dialect).run()


class _Scanner:
    """One pass over the SQL's tokens: literals, identifiers and comments are skipped
    whole (a placeholder inside one is an error); placeholders become binds."""

    def __init__(self, sql: str, dialect: Dialect, *, both: bool = False) -> None:
        self.sql = sql
        self.dialect = dialect
        self.hints: tuple[Dialect, ...] = ("mysql", "postgresql") if both else (dialect,)
        self.names: list[str] = []
        self.binds: dict[str, tuple[str, str, bool]] = {}
        self.parts: list[str] = []
        self.semicolon = -1  # position of the first ';' outside literals and comments

    def run(self) -> Placeholders:
        sql, n, i, start = self.sql, len(self.sql), 0, 0
        while i < n:
            c = sql[i]
            end = -1
            if c == "'" and (m := _QUOTED.match(sql, i)) and not self._prefixed(i):
                self.parts.append(_escape(sql[start:i]))
                self._placeholder(m.group(1), quoted=True, end=m.end())
                i = start = m.end()
                continue
            if c == "'":
                end = self._quoted(i, "'", self._backslashes(i), "a string literal")
            elif c == '"':
                what = "a string literal" if self.dialect == "mysql" else "a quoted identifier"
                end = self._quoted(i, '"', self.dialect == "mysql", what)
            elif c == "`":
                end = self._quoted(i, "`", False, "a quoted identifier")
            elif c == "$" and self.dialect == "postgresql" and not _word(sql, i - 1) and (
                    m := _DOLLAR.match(sql, i)):
                close = sql.find(m.group(0), m.end())
                if close < 0:
                    raise ValueError(f"unterminated dollar-quoted string {_near(sql, i)}")
                end = close + len(m.group(0))
                self._no_tag(i, end, "a dollar-quoted string")
            elif self._line_comment(i):
                end = self._line_end(i)
            elif sql.startswith("/*", i):
                end = self._block_comment(i)
            elif c == ";":
                if self.semicolon >= 0:
                    self._more_statements()
                self.semicolon = i
            elif sql.startswith("<%", i):
                m = _TAG.match(sql, i)
                if m is None:
                    raise ValueError(f"malformed placeholder {_near(sql, i)}: write <%= name %>")
                if _word(sql, m.end()):
                    raise ValueError(
                        f"placeholder <%= {m.group(1)} %> is directly followed by "
                        f"{sql[m.end()]!r} {_near(sql, i)}: a placeholder is a whole value; "
                        "put a space or an operator after it")
                self.parts.append(_escape(sql[start:i]))
                self._placeholder(m.group(1), quoted=False, end=m.end())
                i = start = m.end()
                continue
            if end >= 0:
                if self.semicolon >= 0 and c in "'\"`$":  # a comment may follow the end
                    self._more_statements()
                i = end
            else:
                if self.semicolon >= 0 and not c.isspace() and c != ";":
                    self._more_statements()
                i += 1
        tail = sql[start:]
        if self.semicolon >= start:  # the one trailing ';' is not sent
            cut = self.semicolon - start
            tail = tail[:cut] + tail[cut + 1:]
        self.parts.append(_escape(tail))
        return Placeholders(sql=sql, names=tuple(self.names), _text="".join(self.parts),
                            _binds=tuple(self.binds.values()))

    def _placeholder(self, name: str, *, quoted: bool, end: int) -> None:
        if self.semicolon >= 0:
            self._more_statements()
        if name not in self.names:
            self.names.append(name)
        bind = (_QUOTED_PREFIX if quoted else _BIND_PREFIX) + name
        self.binds.setdefault(bind, (bind, name, quoted))
        # a bind right after a word character would not be read as one by sa.text()
        sep = " " if _word(self.parts[-1][-1:], 0) else ""
        self.parts.append(sep + ":" + bind)

    def _more_statements(self) -> None:
        near = _near(self.sql, self.semicolon)
        raise ValueError(f"the SQL holds more than one statement (';' {near}): a data "
                         "source query is one statement")

    def _prefixed(self, i: int) -> bool:
        # E'...' (PostgreSQL escapes), N'...', _utf8'...', X'...': not a plain literal
        return _word(self.sql, i - 1)

    def _backslashes(self, i: int) -> bool:
        if self.dialect == "mysql":
            return True
        return i > 0 and self.sql[i - 1] in "eE" and not _word(self.sql, i - 2)

    def _quoted(self, i: int, q: str, backslash: bool, what: str) -> int:
        sql, n, j = self.sql, len(self.sql), i + 1
        while j < n:
            c = sql[j]
            if backslash and c == "\\":
                j += 2
                continue
            if c == q:
                if j + 1 < n and sql[j + 1] == q:  # a doubled quote stands for itself
                    j += 2
                    continue
                self._no_tag(i, j + 1, what)
                return j + 1
            j += 1
        raise ValueError(f"unterminated {what} {_near(sql, i)}")

    def _line_comment(self, i: int) -> bool:
        sql = self.sql
        if self.dialect == "mysql":  # '#', or '-- ' with a space (MySQL's rule)
            return sql[i] == "#" or (sql.startswith("--", i) and sql[i + 2:i + 3] in (
                "", " ", "\t", "\r", "\n", "\f", "\v"))
        return sql.startswith("--", i)

    def _line_end(self, i: int) -> int:
        nl = self.sql.find("\n", i)
        end = len(self.sql) if nl < 0 else nl + 1
        self._no_tag(i, end, "a comment")
        return end

    def _block_comment(self, i: int) -> int:
        sql, n, j, depth = self.sql, len(self.sql), i + 2, 1
        nested = self.dialect == "postgresql"
        while j < n:
            if nested and sql.startswith("/*", j):
                depth += 1
                j += 2
            elif sql.startswith("*/", j):
                depth -= 1
                j += 2
                if depth == 0:
                    self._no_tag(i, j, "a comment")
                    if sql.startswith("/*!", i) and ";" in sql[i:j]:
                        self.semicolon = i  # MySQL runs /*! ... */ as SQL
                        self._more_statements()
                    return j
            else:
                j += 1
        raise ValueError(f"unterminated comment {_near(sql, i)}")

    def _no_tag(self, start: int, end: int, what: str) -> None:
        at = self.sql.find("<%", start, end)
        if at < 0:
            return
        m = _TAG.match(self.sql, at)
        name = m.group(1) if m else "name"
        hint = " or ".join(_HINT[d].replace("{n}", name) + f" ({_NAMES[d]})"
                           for d in self.hints)
        raise ValueError(
            f"placeholder inside {what} {_near(self.sql, at)}: a placeholder must stand "
            f"alone as a value, or be the whole quoted literal '<%= {name} %>'; to build a "
            f"string around it use {hint}")


_NAMES = {"mysql": "MySQL", "postgresql": "PostgreSQL"}


def _word(sql: str, i: int) -> bool:
    return 0 <= i < len(sql) and (sql[i].isalnum() or sql[i] in "_$")


def _near(sql: str, i: int) -> str:
    line = sql.count("\n", 0, i) + 1
    return f"at line {line}, near {sql[i:i + 30]!r}"


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
    if isinstance(value, dt.date | dt.datetime | dt.time | decimal.Decimal | uuid.UUID):
        return value
    return str(value)
