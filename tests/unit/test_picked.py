"""Picked audiences: typed ``KEY=VALUE`` values, the generated segment name and its round
trip, and the placeholder checks of a pick."""

from __future__ import annotations

import pytest

from segflowd.app import Segflow
from segflowd.sources.picked import (
    NAME_LIMIT,
    PickError,
    check_values,
    parse_name,
    parse_pairs,
    parse_value,
    picked_name,
)


def defs() -> Segflow:
    app = Segflow(templates="templates")
    app.data_source("communities", source="crm",
                    audience="SELECT id AS profile_id, email FROM users "
                             "WHERE community = <%= community_id %> AND plan = <%= plan %>")
    return app


@pytest.mark.parametrize(("text", "value"), [
    ("42", 42), ("-7", -7), ("1.5", 1.5), ("true", True), ("false", False), ("null", None),
    ('"42"', "42"), ("spring", "spring"), ("007", "007"), ("", ""), ("NaN", "NaN"),
    ("x' OR '1'='1", "x' OR '1'='1"), (" 42 ", 42),
])
def test_a_value_is_json_when_it_parses_as_a_scalar_else_text(text: str, value: object) -> None:
    got = parse_value(text)
    assert got == value
    assert type(got) is type(value)  # 42 is an int, never "42"; true a bool, not 1


@pytest.mark.parametrize("text", ["[1,2]", "{\"a\":1}", "[1,"])
def test_a_json_array_or_object_is_refused(text: str) -> None:
    with pytest.raises(PickError, match="one value"):
        parse_value(text)


def test_pairs_are_typed_and_bad_pairs_name_the_problem() -> None:
    assert parse_pairs(["community_id=42", "plan=pro", "code=a=b"]) == {
        "community_id": 42, "plan": "pro", "code": "a=b"}
    with pytest.raises(PickError, match="wants KEY=VALUE, got 'community_id'"):
        parse_pairs(["community_id"])
    with pytest.raises(PickError, match="wants KEY=VALUE"):
        parse_pairs(["=42"])
    with pytest.raises(PickError, match="gives 'a' twice"):
        parse_pairs(["a=1", "a=2"])
    with pytest.raises(PickError, match=r"--values ids: .*JSON array"):
        parse_pairs(["ids=[1,2]"])


def test_the_generated_name_is_deterministic_and_read_back_with_its_types() -> None:
    app = defs()
    name = picked_name("communities", {"plan": "pro", "community_id": 42})
    assert name == picked_name("communities", {"community_id": 42, "plan": "pro"})
    assert name == 'communities:{"community_id":42,"plan":"pro"}'
    assert parse_name(name, app.data_sources) == ("communities",
                                                  {"community_id": 42, "plan": "pro"})
    assert picked_name("communities", {"community_id": "42", "plan": "pro"}) != name
    assert parse_name("communities", app.data_sources) is None
    assert parse_name("communities:{broken", app.data_sources) is None
    assert parse_name("communities:[1]", app.data_sources) is None
    with pytest.raises(PickError, match="too long"):
        picked_name("communities", {"plan": "x" * NAME_LIMIT})


def test_values_must_give_exactly_the_audience_placeholders() -> None:
    d = defs().data_sources["communities"]
    check_values(d, {"community_id": 1, "plan": "pro"})
    with pytest.raises(PickError, match=r"no placeholder 'team'.*community_id, plan"):
        check_values(d, {"community_id": 1, "plan": "pro", "team": 2})
    with pytest.raises(PickError, match=r"uses <%= plan %>: give it with --values plan="):
        check_values(d, {"community_id": 1})
    with pytest.raises(PickError, match="must be a number, text"):
        check_values(d, {"community_id": {"a": 1}, "plan": "pro"})
