"""The DSL: registration checks at the call site, ago() and intervals."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from segflowd import Segflow, ago
from segflowd.app import evaluating_at, parse_interval
from segflowd.errors import AppError
from segflowd.schema import users

HERE = __file__


def test_ago_binds_now_minus_delta_at_each_evaluation() -> None:
    q = sa.select(users.c.id).where(users.c.created_at >= ago(days=7))
    compiled = q.compile()
    param = next(p for p in compiled.binds.values() if p.callable is not None)
    with evaluating_at(dt.datetime(2026, 3, 10, 12)):
        assert param.callable() == dt.datetime(2026, 3, 3, 12)
    with evaluating_at(dt.datetime(2026, 3, 20, 12)):
        assert param.callable() == dt.datetime(2026, 3, 13, 12)


def test_ago_needs_a_positive_duration() -> None:
    with pytest.raises(AppError, match="positive duration"):
        ago()


@pytest.mark.parametrize(("value", "seconds"), [
    ("30s", 30.0), ("15m", 900.0), ("1h", 3600.0), ("2d", 172800.0), ("1w", 604800.0),
    (90, 90.0), ("1.5h", 5400.0),
])
def test_intervals(value: str | int, seconds: float) -> None:
    assert parse_interval(value) == seconds


@pytest.mark.parametrize("bad", ["soon", "15 minutes", "0s", -1])
def test_bad_intervals_say_how_to_write_one(bad: str | int) -> None:
    with pytest.raises(AppError):
        parse_interval(bad)


def test_registration_errors_point_at_the_calling_line() -> None:
    app = Segflow()
    with pytest.raises(AppError) as info:
        app.segment("s", sql="SELECT id FROM users", refresh="often")
    assert f"{HERE}:" in str(info.value)
    assert "bad interval 'often'" in str(info.value)


def test_params_without_sql_is_refused() -> None:
    app = Segflow()
    with pytest.raises(AppError, match="params= only goes with sql="):
        app.segment("s", params={"x": 1})


def test_campaign_behavior_must_be_static_or_dynamic() -> None:
    app = Segflow()
    with pytest.raises(AppError, match="behavior"):
        @app.campaign("c", segments=["s"], behavior="sometimes")  # type: ignore[arg-type]
        def c(ctx: object, rt: object):  # type: ignore[no-untyped-def]
            yield None


def test_bad_names_are_refused() -> None:
    app = Segflow()
    with pytest.raises(AppError, match="template"):
        app.template("has space", subject="x", html="x.html")


def test_templates_folder_is_relative_to_the_creating_file() -> None:
    app = Segflow(templates="mail")
    assert str(app.templates_dir).endswith("tests/unit/mail")
    assert Segflow(templates="/abs/mail").templates_dir.as_posix() == "/abs/mail"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 10**400, "1000000w", 0, "-1d"])
def test_an_interval_that_is_not_a_positive_span_a_date_holds_is_refused(bad: object) -> None:
    with pytest.raises(AppError, match=r"interval|positive"):
        parse_interval(bad)  # type: ignore[arg-type]


def test_a_goal_window_past_the_calendar_is_a_registration_error() -> None:
    app = Segflow()
    with pytest.raises(AppError, match="hundred years"):
        app.campaign("c", segments=["s"], goal=("purchase", "1000000w"))
