"""Segments for which :func:`segflowd.simrefresh.time_binds` claims to follow the time,
yet what the segment returns changes at a moment it does not foresee.

Each shape either must be refused (``time_binds(...) is None``) or, run as a
simulation, must enter and leave users at the same moments as a simulation that looks
at every due refresh (``time_binds`` patched to ``lambda seg: None``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from test_simrefresh import core, raw

import segflowd.simrefresh
from segflowd import Segflow, ago
from segflowd.schema import events, users
from segflowd.testing import Simulation

START = dt.datetime(2026, 3, 1, 9, 0)
Changes = list[tuple[dt.datetime, str, str]]


def raw_app(sql: str) -> Callable[[], Segflow]:
    def make() -> Segflow:
        app = Segflow()
        app.segment("s", refresh="1h", sql=sql, params={"cutoff": ago(days=1)})
        return app
    return make


def core_app(query: Callable[[], sa.Select[tuple[str]]]) -> Callable[[], Segflow]:
    def make() -> Segflow:
        app = Segflow()
        app.segment("s", refresh="1h")(query)
        return app
    return make


def old_login(sim: Simulation) -> None:
    """Ann logs in at the start with an event time 30 days back."""
    sim.user("ann", email="ann@example.com")
    sim.event("ann", "login", at=START - dt.timedelta(days=30))
    sim.advance(days=3)


def old_login_week(sim: Simulation) -> None:
    """As old_login, watched for five days."""
    old_login(sim)
    sim.advance(days=2)


def late_login(sim: Simulation) -> None:
    """Ann, created at the start, logs in twelve hours later."""
    sim.user("ann", email="ann@example.com")
    sim.advance(hours=12)
    sim.event("ann", "login")
    sim.advance(days=3)


def changes(make: Callable[[], Segflow], scenario: Callable[[Simulation], None]) -> Changes:
    with Simulation(make(), start=START) as sim:
        scenario(sim)
        return [(e.at, e.kind, e.user_id) for e in sim.timeline()
                if e.kind.startswith("segment.")]


def assert_same_as_looking_every_time(make: Callable[[], Segflow],
                                      scenario: Callable[[Simulation], None],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(segflowd.simrefresh, "time_binds", lambda seg: None)
        every = changes(make, scenario)
    assert every, "the scenario must enter someone"
    assert changes(make, scenario) == every


# -- raw SQL: names the tokenizer does not count ---------------------------------------

# SQLite takes a string literal as a column alias (AS 'x', or 'x' alone): the compared
# name then holds computed (or other stored) values though it appears once as a word.
STRING_ALIAS = ("SELECT id FROM (SELECT user_id AS id, received_at AS 'created_at' "
                "FROM events) WHERE created_at < :cutoff")
STRING_ALIAS_NO_AS = ("SELECT id FROM (SELECT user_id AS id, "
                      "datetime(received_at, '+1 day') 'created_at' FROM events) "
                      "WHERE created_at < :cutoff")
# ... and as a CTE column name.
STRING_CTE_COLUMN = ("WITH t(id, 'created_at') AS (SELECT user_id, received_at FROM events) "
                     "SELECT id FROM t WHERE created_at < :cutoff")
# A compound SELECT takes its column names from its first arm, here from `*`: the
# second arm's values (received_at, or a literal date) go by the name created_at.
STAR_UNION = ("SELECT user_id AS id FROM (SELECT * FROM events WHERE name = 'signup' "
              "UNION ALL SELECT id, user_id, anonymous_id, name, attributes, dedupe_key, "
              "received_at, received_at FROM events WHERE name = 'login') "
              "WHERE created_at < :cutoff")
STAR_VALUES = ("SELECT id FROM (SELECT * FROM users WHERE 0 UNION ALL VALUES ('ann', NULL, "
               "'{}', '2026-03-02 12:00:00.000000', '2026-03-02 12:00:00.000000')) "
               "WHERE created_at < :cutoff")
# SQLite takes a string literal as a table name: the table read is not among the words,
# and the compared column is taken to be another named table's created_at.
STRING_TABLE = ("SELECT user_id AS id FROM 'events' WHERE created_at < :cutoff "
                "AND user_id IN (SELECT id FROM users)")
# SQLite's whitespace is ASCII; a no-break space is part of an identifier to it, but
# whitespace to the tokenizer: "where\xa0created_at" is one column (an alias of
# received_at) to SQLite, the keyword WHERE and the column created_at to the tokenizer.
NBSP_IDENTIFIER = ('SELECT id FROM (SELECT user_id AS id, received_at AS '
                   '"where\u00a0created_at" FROM events) WHERE where\u00a0created_at < :cutoff')


@pytest.mark.parametrize("sql", [STRING_ALIAS, STRING_ALIAS_NO_AS, STRING_CTE_COLUMN,
                                 STAR_UNION, STAR_VALUES, NBSP_IDENTIFIER],
                         ids=["string_alias", "string_alias_no_as", "string_cte_column",
                              "star_union", "star_values", "nbsp"])
def test_a_compared_name_that_is_not_a_stored_column_is_refused(sql: str) -> None:
    assert raw(sql, cutoff=ago(days=1)) is None


def test_a_table_named_by_a_string_is_among_the_columns_followed() -> None:
    """FROM 'events': the events table's created_at is followed (with users', which the
    SQL also names: more looks, never fewer)."""
    found = raw(STRING_TABLE, cutoff=ago(days=1))
    assert found is not None
    assert ("events", "created_at") in found[0].columns


@pytest.mark.parametrize(("sql", "scenario"), [
    (STRING_ALIAS, old_login), (STAR_UNION, old_login), (STAR_VALUES, old_login),
    (STRING_TABLE, late_login), (NBSP_IDENTIFIER, old_login),
], ids=["string_alias", "star_union", "star_values", "string_table", "nbsp"])
def test_raw_alias_tricks_enter_when_looking_every_time_does(
        sql: str, scenario: Callable[[Simulation], None],
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert_same_as_looking_every_time(raw_app(sql), scenario, monkeypatch)


# -- the database's own clock, without the word "now" ----------------------------------

@pytest.mark.parametrize("sql", [
    "SELECT id FROM users WHERE created_at > date()",  # no time value: 'now'
    "SELECT id FROM users WHERE created_at > datetime()",
    "SELECT id FROM users WHERE julianday() - julianday(created_at) > 7",
    "SELECT id FROM users WHERE time() > '12:00:00'",
    "SELECT id FROM users WHERE CAST(strftime('%s') AS INTEGER) % 2 = 0",
    "SELECT id FROM users WHERE created_at > datetime('n' || 'ow', '-7 days')",
])
def test_raw_sql_reading_the_clock_is_refused(sql: str) -> None:
    assert raw(sql) is None


def test_a_param_that_becomes_now_is_refused() -> None:
    assert raw("SELECT id FROM users WHERE created_at > datetime(:p || 'ow', '-7 days')",
               p="n") is None


def test_core_reading_the_clock_is_refused() -> None:
    assert core(sa.select(users.c.id).where(users.c.created_at > sa.func.date())) is None
    assert core(sa.select(users.c.id).where(
        sa.func.julianday() - sa.func.julianday(users.c.created_at) > 7)) is None


# -- Core ------------------------------------------------------------------------------

def shared_bind() -> sa.Select[tuple[str]]:
    """One bind object, compared with created_at and also inside julianday()."""
    cut = sa.bindparam("cut", callable_=ago(days=1).resolve, type_=sa.DateTime())
    return (sa.select(events.c.user_id)
            .where(events.c.created_at < cut,
                   sa.func.julianday(cut) - sa.func.julianday(events.c.received_at) > 2))


def shadowing_cte() -> sa.Select[tuple[str]]:
    """A CTE named users shadows the store's table: users.created_at is received_at."""
    shadow = sa.select(events.c.user_id.label("id"),
                       events.c.received_at.label("created_at")).cte("users")
    return sa.select(users.c.id).where(users.c.created_at < ago(days=1)).add_cte(shadow)


def test_a_core_bind_used_also_outside_a_comparison_is_refused() -> None:
    assert core(shared_bind()) is None


def test_a_core_bind_used_also_outside_a_comparison_is_followed_exactly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert_same_as_looking_every_time(core_app(shared_bind), old_login_week, monkeypatch)


def test_a_cte_shadowing_a_store_table_is_refused() -> None:
    assert core(shadowing_cte()) is None


def test_a_cte_shadowing_a_store_table_is_followed_exactly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert_same_as_looking_every_time(core_app(shadowing_cte), late_login, monkeypatch)
