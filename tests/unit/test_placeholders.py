"""Placeholders: <%= name %> quoted or bare becomes a bound parameter, never SQL text."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import mysql, postgresql

from segflowd.errors import PlaceholderError
from segflowd.placeholders import parse

PG = postgresql.asyncpg.dialect()  # type: ignore[attr-defined]  # dialect module attribute
MY = mysql.aiomysql.dialect()  # type: ignore[attr-defined]  # dialect module attribute


def test_quoted_and_bare_placeholders_become_binds_in_order_of_first_use() -> None:
    p = parse("SELECT 1 FROM t WHERE a = '<%= community_id %>' AND b = <%=limit%> "
              "AND c = '<%= community_id %>'")
    assert p.names == ("community_id", "limit")
    sql = str(p.bind({"community_id": 7, "limit": 3}, source="s", what="q").compile(
        dialect=PG))
    assert "'" not in sql  # the quotes went with the placeholder
    assert "<%" not in sql
    assert sql.count("$1") == 2
    assert "$2" in sql


def test_injection_payload_stays_a_parameter_value() -> None:
    payload = "x' OR '1'='1"
    stmt = parse("SELECT * FROM users WHERE id = '<%= profile_id %>'").bind(
        {"profile_id": payload}, source="crm", what="preload")
    compiled = stmt.compile(dialect=MY)
    assert "OR" not in str(compiled)
    assert list(compiled.params.values()) == [payload]


def test_quoted_placeholder_binds_its_value_as_text_and_bare_keeps_the_type() -> None:
    stmt = parse("SELECT 1 WHERE a = '<%= n %>' AND b = <%= n %>").bind(
        {"n": 42}, source="s", what="q")
    params = stmt.compile(dialect=PG).params
    assert {type(v) for v in params.values()} == {int, str}
    assert set(map(str, params.values())) == {"42"}


def test_casts_json_operators_and_colons_in_literals_are_left_alone() -> None:
    sql = ("SELECT (m->'s'->>'n')::boolean AS b, '10:30' AS t FROM u "
           "WHERE m ? 'preferences' AND id = '<%= profile_id %>'")
    compiled = str(parse(sql).bind({"profile_id": "u"}, source="s", what="q").compile(
        dialect=PG))
    assert "::boolean" in compiled
    assert "'10:30'" in compiled
    assert "m ? 'preferences'" in compiled


def test_missing_value_is_an_error_naming_the_placeholder_and_source() -> None:
    p = parse("SELECT 1 FROM t WHERE id = '<%= profile_id %>'")
    with pytest.raises(PlaceholderError) as info:
        p.bind({"user_id": "u1"}, source="crm", what="preload query of data source 'p'")
    assert "<%= profile_id %>" in str(info.value)
    assert "preload query of data source 'p'" in str(info.value)
    assert info.value.source == "crm"


def test_missing_lists_the_placeholders_not_among_known_names() -> None:
    p = parse("SELECT 1 WHERE a = <%= a %> AND b = '<%= b %>'")
    assert p.missing(["a", "profile_id"]) == ["b"]
    assert p.missing(["a", "b"]) == []


@pytest.mark.parametrize("bad", ["SELECT <% a %>", "SELECT <%= %>", "SELECT <%= a"])
def test_malformed_placeholder_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="malformed placeholder"):
        parse(bad)


def test_sql_without_placeholders_is_unchanged() -> None:
    stmt = parse("SELECT id FROM communities WHERE active = true").bind(
        {}, source="s", what="q")
    assert str(stmt.compile(dialect=PG)) == "SELECT id FROM communities WHERE active = true"
