"""Which segments a simulation may leave unprobed until a stored time is reached.

:func:`segflowd.simrefresh.time_binds` must never claim to follow a segment's time when
it cannot: a wrong answer would make a simulation skip a refresh that changes something.
Each refused shape here is one where a bind does not meet a stored value directly.
"""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from segflowd import Segflow, ago
from segflowd.schema import events, users
from segflowd.segments.query import compile_segment
from segflowd.simrefresh import TimeBind, time_binds

DAY = dt.timedelta(days=1)


def raw(sql: str, **params: object) -> tuple[TimeBind, ...] | None:
    app = Segflow()
    app.segment("s", sql=sql, params=params)
    return time_binds(compile_segment(app.segments["s"]))


def core(query: sa.Select[tuple[str]]) -> tuple[TimeBind, ...] | None:
    app = Segflow()
    app.segment("s")(lambda: query)
    return time_binds(compile_segment(app.segments["s"]))


EVENTS_AT = frozenset({("events", "created_at")})


@pytest.mark.parametrize("sql", [
    "SELECT user_id AS id FROM events WHERE name = 'login' GROUP BY user_id "
    "HAVING MAX(created_at) < :cutoff",
    "SELECT user_id AS id FROM events WHERE created_at >= :cutoff",
    "SELECT user_id AS id FROM events WHERE :cutoff > events.created_at AND name = 'x'",
    "SELECT user_id AS id FROM events e WHERE (e.created_at <= :cutoff)",
    "SELECT user_id AS id FROM events GROUP BY user_id HAVING :cutoff <= min(created_at)",
    "SELECT user_id AS id FROM events WHERE NOT created_at < :cutoff",
    'SELECT user_id AS id FROM events WHERE "created_at" > :cutoff',
    "SELECT user_id AS id FROM events GROUP BY user_id "
    "HAVING count(*) > 2 AND MAX(created_at) < :cutoff",
])
def test_a_bind_compared_with_a_stored_date_is_followed(sql: str) -> None:
    assert raw(sql, cutoff=ago(days=30)) == (TimeBind(30 * DAY, EVENTS_AT),)


@pytest.mark.parametrize(("sql", "why"), [
    ("SELECT user_id AS id FROM events WHERE julianday(created_at) < julianday(:cutoff)",
     "inside a function"),
    ("SELECT user_id AS id FROM events WHERE created_at + 1 < :cutoff", "arithmetic left"),
    ("SELECT user_id AS id FROM events WHERE created_at < :cutoff || 'x'", "arithmetic right"),
    ("SELECT user_id AS id FROM events WHERE created_at BETWEEN :cutoff AND '2030-01-01'",
     "BETWEEN"),
    ("SELECT user_id AS id FROM events WHERE created_at = :cutoff", "= in raw SQL"),
    ("SELECT user_id AS id FROM events WHERE x < created_at < :cutoff", "a chain"),
    ("SELECT user_id AS id FROM events WHERE name < :cutoff", "not a date column"),
    ("SELECT id FROM (SELECT user_id AS id, datetime(created_at, '+1 day') AS created_at "
     "FROM events) WHERE created_at < :cutoff", "an alias of something computed"),
    ("SELECT user_id AS id FROM events WHERE created_at < :cutoff -- a comment",
     "a comment"),
    ("SELECT user_id AS id FROM events WHERE created_at < :cutoff "
     "AND created_at > datetime('now', '-90 days')", "the database's clock"),
    ("SELECT id FROM users WHERE created_at < :cutoff AND random() > 0", "random()"),
    ("SELECT user_id AS id FROM events WHERE created_at < coalesce(:cutoff, 0)",
     "inside coalesce"),
    ("SELECT user_id AS id FROM nowhere WHERE created_at < :cutoff", "an unknown table"),
    ("SELECT user_id AS id FROM events WHERE created_at < :cutoff AND user_id <> ?1",
     "a numbered parameter"),
    ("SELECT id FROM (SELECT * FROM users) WHERE created_at < :cutoff", "SELECT *"),
])
def test_a_bind_used_any_other_way_is_not_followed(sql: str, why: str) -> None:
    assert raw(sql, cutoff=ago(days=30)) is None, why


def test_raw_sql_without_ago_depends_on_no_time() -> None:
    assert raw("SELECT user_id AS id FROM events WHERE name = :n", n="vip") == ()
    assert raw("SELECT id FROM users WHERE created_at > :t",
               t=dt.datetime(2026, 1, 1)) == ()


def test_every_use_of_a_bind_must_be_followed() -> None:
    sql = ("SELECT user_id AS id FROM events WHERE created_at < :cutoff "
           "OR julianday(:cutoff) > 0")
    assert raw(sql, cutoff=ago(days=1)) is None


def test_core_comparisons_with_stored_dates_are_followed() -> None:
    q = (sa.select(users.c.id).where(users.c.created_at >= ago(days=14),
                                     users.c.created_at < ago(days=7)))
    assert sorted(core(q) or (), key=lambda b: b.delta) == [
        TimeBind(7 * DAY, frozenset({("users", "created_at")})),
        TimeBind(14 * DAY, frozenset({("users", "created_at")}))]
    q = (sa.select(events.c.user_id).group_by(events.c.user_id)
         .having(sa.func.max(events.c.created_at) == ago(hours=1)))
    assert core(q) == (TimeBind(dt.timedelta(hours=1), EVENTS_AT),)
    sub = sa.select(events.c.user_id).where(events.c.created_at > ago(days=2)).subquery()
    assert core(sa.select(users.c.id).where(users.c.id.in_(sa.select(sub.c.user_id)))) == (
        TimeBind(2 * DAY, EVENTS_AT),)
    assert core(sa.select(users.c.id).where(users.c.email == "a@example.com")) == ()


@pytest.mark.parametrize("query", [
    sa.select(users.c.id).where(users.c.created_at + 1 > ago(days=5)),
    sa.select(users.c.id).where(sa.func.date(users.c.created_at) > ago(days=5)),
    sa.select(users.c.id).where(users.c.created_at > sa.func.now()),
    sa.select(users.c.id).where(users.c.created_at > sa.func.date("now", "-5 days")),
    sa.select(users.c.id).where(users.c.email < ago(days=5)),
    sa.select(users.c.id).where(users.c.created_at > ago(days=5),
                                users.c.updated_at.between(ago(days=9), ago(days=1))),
])
def test_core_binds_used_any_other_way_are_not_followed(query: sa.Select[tuple[str]]
                                                         ) -> None:
    assert core(query) is None
