"""Where a placeholder may stand: a value position or a whole quoted literal, read with
each database's lexical rules; everywhere else, and a second statement, is an error that
says how to write it instead. And every customer value converts to JSON."""

from __future__ import annotations

import decimal
import math

import pytest
from sqlalchemy.dialects import mysql, postgresql

from segflowd.errors import SourceError
from segflowd.placeholders import parse
from segflowd.sourcedefs import parse_query
from segflowd.sources.values import json_row, json_value

PG = postgresql.asyncpg.dialect()  # type: ignore[no-untyped-call]  # untyped in SQLAlchemy
MY = mysql.aiomysql.dialect()

ACCEPTED = [
    ("bare", "SELECT 1 FROM t WHERE a = <%= q %>", None),
    ("quoted literal", "SELECT 1 FROM t WHERE a = '<%= q %>'", None),
    ("inside CONCAT", "SELECT 1 FROM t WHERE a LIKE CONCAT('%', <%= q %>, '%')", "mysql"),
    ("inside ||", "SELECT 1 FROM t WHERE a LIKE '%' || <%= q %> || '%'", "postgresql"),
    ("after a doubled quote", "SELECT 'it''s' FROM t WHERE a = <%= q %>", None),
    ("after a MySQL backslash escape", "SELECT 'a\\'b' FROM t WHERE a = <%= q %>", "mysql"),
    ("after a dollar-quoted string", "SELECT $x$ it's $x$ FROM t WHERE a = <%= q %>",
     "postgresql"),
    ("after a comment", "SELECT 1 /* it's */ FROM t -- it's\nWHERE a = <%= q %>", None),
    ("with one trailing semicolon", "SELECT 1 FROM t WHERE a = <%= q %>; -- done", None),
    ("before a closing parenthesis", "SELECT 1 FROM t WHERE a IN (<%= q %>)", None),
]

REFUSED = [
    ("inside a literal", "SELECT 1 FROM t WHERE a LIKE '%<%= q %>%'", None,
     "placeholder inside a string literal"),
    ("inside an E'' literal", "SELECT 1 FROM t WHERE a = E'<%= q %>'", "postgresql",
     "placeholder inside a string literal"),
    ("inside a MySQL double-quoted literal", 'SELECT 1 FROM t WHERE a = "<%= q %>"', "mysql",
     "placeholder inside a string literal"),
    # MySQL reads "..." as a string: with no dialect known, that is the error seen
    ("inside a PostgreSQL quoted identifier", 'SELECT "<%= q %>" FROM t', "postgresql",
     "placeholder inside a (quoted identifier|string literal)"),
    ("inside a backtick identifier", "SELECT `<%= q %>` FROM t", "mysql",
     "placeholder inside a quoted identifier"),
    ("inside a dollar-quoted string", "SELECT $$<%= q %> $$", "postgresql",
     "placeholder inside a dollar-quoted string"),
    ("inside a -- comment", "SELECT 1 -- <%= q %>\nFROM t", None,
     "placeholder inside a comment"),
    ("inside a # comment", "SELECT 1 # <%= q %>\nFROM t", "mysql",
     "placeholder inside a comment"),
    ("inside a /* */ comment", "SELECT 1 /* <%= q %> */ FROM t", None,
     "placeholder inside a comment"),
    ("inside a nested comment", "SELECT 1 /* a /* b */ <%= q %> */ FROM t", "postgresql",
     "placeholder inside a comment"),
    ("after a backslash-escaped quote", "SELECT 'a\\' <%= q %>' FROM t", "mysql",
     "placeholder inside a string literal"),
    ("glued to a word", "SELECT 1 FROM t WHERE a = <%=q%>abc", None,
     "directly followed by 'a'"),
    ("two statements", "SELECT 1 FROM t WHERE a = <%= q %>; DROP TABLE t", None,
     "more than one statement"),
    ("two statements, no placeholder", "SELECT 1; SELECT 2", None,
     "more than one statement"),
    ("a semicolon inside /*! */", "SELECT 1 /*!; DROP TABLE t */", "mysql",
     "more than one statement"),
    ("unterminated literal", "SELECT 'abc FROM t WHERE a = <%= q %>", None, "unterminated"),
]


@pytest.mark.parametrize(("position", "sql", "dialect"), ACCEPTED,
                         ids=[a[0] for a in ACCEPTED])
def test_accepted_positions_bind_the_value_as_one_parameter(
        position: str, sql: str, dialect: str | None) -> None:
    p = parse(sql, dialect)  # type: ignore[arg-type]  # a Dialect literal or None
    assert p.names == ("q",)
    stmt = p.bind({"q": "x' OR '1'='1"}, source="s", what=position)
    compiled = stmt.compile(dialect=PG if dialect == "postgresql" else MY)
    assert "<%" not in str(compiled)
    assert "OR '1'" not in str(compiled)
    assert list(compiled.params.values()) == ["x' OR '1'='1"]
    assert ";" not in str(compiled)  # a trailing ';' is not sent


@pytest.mark.parametrize(("position", "sql", "dialect", "message"), REFUSED,
                         ids=[r[0] for r in REFUSED])
def test_refused_positions_name_the_problem(position: str, sql: str, dialect: str | None,
                                            message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(sql, dialect)  # type: ignore[arg-type]  # a Dialect literal or None
    with pytest.raises(ValueError, match=message):
        parse(sql)  # and at app load, before the source's dialect is known


def test_placeholder_in_a_literal_suggests_the_dialects_concatenation() -> None:
    sql = "SELECT id FROM t WHERE name LIKE '%<%= q %>%'"
    with pytest.raises(ValueError, match="inside a string literal") as my:
        parse(sql, "mysql")
    assert "CONCAT('%', <%= q %>, '%') (MySQL)" in str(my.value)
    assert "||" not in str(my.value)
    with pytest.raises(ValueError, match="inside a string literal") as pg:
        parse(sql, "postgresql")
    assert "'%' || <%= q %> || '%' (PostgreSQL)" in str(pg.value)
    assert "CONCAT" not in str(pg.value)
    with pytest.raises(ValueError, match="inside a string literal") as both:
        parse(sql)
    assert "CONCAT(" in str(both.value)
    assert "||" in str(both.value)


def test_app_load_reports_the_position_with_the_definitions_origin() -> None:
    with pytest.raises(ValueError, match=r"^app\.py:7: data source 'crm': audience query: "
                                         r"placeholder inside a string literal"):
        parse_query("audience", "crm", "SELECT 1 WHERE a LIKE '%<%= q %>%'", "app.py:7")


def test_colons_in_literals_and_comments_are_not_binds() -> None:
    p = parse("SELECT '10:30', a::text /* :x */ FROM t WHERE b = <%= q %>", "postgresql")
    compiled = str(p.bind({"q": 1}, source="s", what="q").compile(dialect=PG))
    assert "'10:30'" in compiled
    assert "::text" in compiled
    assert "/* :x */" in compiled
    assert "$1" in compiled


@pytest.mark.parametrize(("value", "expected"), [
    (decimal.Decimal("Infinity"), "Infinity"),
    (decimal.Decimal("-Infinity"), "-Infinity"),
    (decimal.Decimal("NaN"), "NaN"),
    (float("inf"), "Infinity"),
    (float("-inf"), "-Infinity"),
    (float("nan"), "NaN"),
    (decimal.Decimal("1E+400"), "1E+400"),
    (decimal.Decimal("1.5E+400"), "1.5E+400"),
    (decimal.Decimal("1E+100000"), "1E+100000"),
    (decimal.Decimal("123456789012345678901234567890"), "123456789012345678901234567890"),
    (2**70, str(2**70)),
    (decimal.Decimal("42"), 42),
    (decimal.Decimal("2.5"), 2.5),
    (7, 7),
])
def test_json_value_gives_a_stated_representation_for_every_number(
        value: object, expected: object) -> None:
    got = json_value(value)
    assert got == expected
    assert not (isinstance(got, float) and not math.isfinite(got))


def test_json_row_names_the_column_whose_value_cannot_convert() -> None:
    class Weird:
        def __str__(self) -> str:
            raise ValueError("no text")

    with pytest.raises(SourceError, match=r"preload query: column 'plan' holds a value"):
        json_row({"id": 1, "plan": Weird()}, source="crm", what="preload query")
