"""Compiling segments: the tables they read, and narrowing them to a batch of users."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.dialects import sqlite

from segflowd.app import Segflow, ago
from segflowd.errors import AppError
from segflowd.schema import events, messages, users
from segflowd.segments.query import compile_segment


def make_app() -> Segflow:
    app = Segflow(templates="templates")

    @app.segment("big-spenders")
    def big_spenders():  # type: ignore[no-untyped-def]
        amount = events.c.attributes["amount"].as_float()
        return (select(users.c.id).join(events, events.c.user_id == users.c.id)
                .where(events.c.name == "purchase").group_by(users.c.id)
                .having(func.sum(amount) > 1000))

    @app.segment("new-users")
    def new_users():  # type: ignore[no-untyped-def]
        return select(users.c.id).where(users.c.created_at >= ago(days=7))

    @app.segment("mailed")
    def mailed():  # type: ignore[no-untyped-def]
        return select(messages.c.user_id).where(messages.c.status == "sent").distinct()

    @app.segment("top-10")
    def top_10():  # type: ignore[no-untyped-def]
        return select(users.c.id).order_by(users.c.created_at).limit(10)

    app.segment("raw", sql="SELECT user_id AS id FROM events WHERE name = 'login'")
    return app


def sql_of(stmt: sa.Select[tuple[str]]) -> str:
    return str(stmt.compile(dialect=sqlite.dialect()))


def test_core_segments_know_the_tables_they_read() -> None:
    segs = {n: compile_segment(d) for n, d in make_app().segments.items()}
    assert segs["big-spenders"].tables == frozenset({"users", "events"})
    assert segs["new-users"].tables == frozenset({"users"})
    assert segs["mailed"].tables == frozenset({"messages"})


def test_only_segments_reading_ingested_tables_can_change_on_ingest() -> None:
    segs = {n: compile_segment(d) for n, d in make_app().segments.items()}
    ingest = frozenset({"users", "events"})
    assert segs["big-spenders"].reads_any(ingest)
    assert not segs["mailed"].reads_any(ingest)
    assert segs["raw"].tables is None  # raw SQL: cannot tell, so it is always evaluated
    assert segs["raw"].reads_any(ingest)


def test_a_grouped_core_segment_is_narrowed_in_its_own_where_before_grouping() -> None:
    seg = compile_segment(make_app().segments["big-spenders"])
    text = sql_of(seg.among(["a", "b"]))
    where, _, rest = text.partition("GROUP BY")
    assert "users.id IN" in where
    assert "HAVING" in rest


def test_limited_and_raw_segments_are_narrowed_as_a_subquery() -> None:
    app = make_app()
    for name in ("top-10", "raw"):
        text = sql_of(compile_segment(app.segments[name]).among(["a"]))
        assert "FROM (SELECT" in text
        assert "segment.id IN" in text


@pytest.mark.parametrize(("sql", "params", "says"), [
    ("SELECT id FROM users WHERE created_at < :cutoff", {"cutof": 1},
     ["the SQL uses :cutoff, which params= does not give",
      "params= gives 'cutof', which the SQL never uses"]),
    ("SELECT id FROM users WHERE created_at < :cutoff", {}, [":cutoff"]),
    ("SELECT id FROM users", {"plan": "pro"}, ["'plan'", "never uses"]),
])
def test_segment_params_must_match_the_sql_binds(sql: str, params: dict[str, object],
                                                 says: list[str]) -> None:
    """#16 defect 3: an AppError naming the definition's file and line, not SQLAlchemy's."""
    app = Segflow(templates="templates")
    app.segment("typo", sql=sql, params=params)
    defn = app.segments["typo"]
    with pytest.raises(AppError) as err:
        compile_segment(defn)
    assert str(err.value).startswith(f"{defn.origin}: segment 'typo': ")
    for part in says:
        assert part in str(err.value)
