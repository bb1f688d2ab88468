"""The data source DSL: app.data_source, app.audience_segment and what check can know."""

from __future__ import annotations

import pytest

from segflowd.app import Segflow
from segflowd.errors import AppError
from segflowd.sourcedefs import AUDIENCE_SQL, check_sources

AUDIENCE = ("SELECT u.id AS profile_id, u.email FROM users u JOIN memberships m "
            "ON u.id = m.user_id WHERE m.community_id = '<%= community_id %>'")
PRELOAD = "SELECT plan_name FROM user_profiles WHERE user_id = '<%= profile_id %>'"


def make_app() -> Segflow:
    app = Segflow(templates="templates")
    app.data_source("communities", source="crm", audience=AUDIENCE, preload=PRELOAD,
                    discovery="SELECT id, community_name FROM communities")
    return app


def test_data_source_keeps_its_queries_and_their_placeholders() -> None:
    app = make_app()
    d = app.data_sources["communities"]
    assert d.source == "crm"
    assert d.audience.names == ("community_id",)
    assert d.preload is not None
    assert d.preload.names == ("profile_id",)
    assert d.discovery is not None
    assert d.discovery.names == ()


def test_audience_segment_is_a_sql_segment_over_audience_members() -> None:
    app = make_app()
    app.audience_segment("gardeners", data_source="communities",
                         values={"community_id": 1}, refresh="15m")
    seg = app.segments["gardeners"]
    assert seg.sql == AUDIENCE_SQL
    assert seg.params == {"audience": "gardeners"}
    assert seg.refresh == 900.0
    assert app.audiences["gardeners"].values == {"community_id": 1}
    assert app.problems() == []


def test_audience_values_missing_a_placeholder_is_a_problem_naming_it() -> None:
    app = make_app()
    app.audience_segment("gardeners", data_source="communities", values={"community": 1})
    (problem,) = app.problems()
    assert "'gardeners'" in problem
    assert "<%= community_id %>" in problem


def test_audience_segment_naming_an_unknown_data_source_is_a_problem() -> None:
    app = make_app()
    app.audience_segment("x", data_source="nope", values={})
    assert any("unknown data source 'nope'" in p for p in app.problems())


def test_preload_placeholder_that_is_neither_profile_id_nor_a_value_is_a_problem() -> None:
    app = Segflow(templates="templates")
    app.data_source("d", source="crm", audience="SELECT 1 AS profile_id, 'a' AS email",
                    preload="SELECT 1 WHERE a = <%= tenant %>")
    app.audience_segment("all", data_source="d")
    (problem,) = app.problems()
    assert "preload" in problem
    assert "<%= tenant %>" in problem


def test_discovery_with_a_placeholder_is_a_problem() -> None:
    app = Segflow(templates="templates")
    app.data_source("d", source="crm", audience="SELECT 1 AS profile_id, 'a' AS email",
                    discovery="SELECT id FROM c WHERE x = <%= y %>")
    assert any("discovery query takes no placeholders" in p for p in app.problems())


def test_duplicate_data_source_and_malformed_placeholder_raise_at_registration() -> None:
    app = make_app()
    with pytest.raises(AppError, match="already defined"):
        app.data_source("communities", source="crm", audience=AUDIENCE)
    with pytest.raises(AppError, match="malformed placeholder"):
        app.data_source("bad", source="crm", audience="SELECT <% x %>")


def test_audience_segment_name_clashing_with_a_segment_raises() -> None:
    app = make_app()
    app.segment("gardeners", sql="SELECT id FROM users")
    with pytest.raises(AppError, match="already defined"):
        app.audience_segment("gardeners", data_source="communities",
                             values={"community_id": 1})


def test_check_sources_reports_a_source_segflow_toml_lacks() -> None:
    app = make_app()
    assert check_sources(app.data_sources, {"crm": object()}) == []
    (problem,) = check_sources(app.data_sources, {"warehouse": object()})
    assert "[sources.crm]" in problem
    assert "warehouse" in problem
