"""The JSON accessors of ``users.attributes`` select the same users on SQLite and MariaDB.

One table of Core predicates runs on both stores over users whose attribute ``v`` covers
every kind of JSON value; each predicate's members must be the set stated beside it, on
both. The rule it proves: ``as_boolean()``, ``as_integer()``, ``as_float()`` and
``as_string()`` give the value when it is of their JSON type (``as_float()`` takes any
number) and NULL otherwise (key missing, JSON null, another type), so a type mismatch
never matches a comparison and always matches ``IS NULL``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from segflowd import schema
from segflowd.app import Segflow
from segflowd.segments.query import apply_batch, compile_segment, refresh_diff
from segflowd.store import Store

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 1, 1)

# user id -> attributes: every kind of value ``v`` can hold.
USERS: dict[str, dict[str, object]] = {
    "missing": {},
    "null": {"v": None},
    "true": {"v": True},
    "false": {"v": False},
    "zero": {"v": 0},
    "one": {"v": 1, "w": 10},
    "int10": {"v": 10},
    "float": {"v": 2.5},
    "float10": {"v": 10.0},
    "str10": {"v": "10"},
    "strtrue": {"v": "true"},
    "str": {"v": "pro"},
    "strpad": {"v": "pro "},  # a trailing blank is part of the string
    "obj": {"v": {"a": 1, "b": "x"}},
    "arr": {"v": [1, 2]},
}
ALL = frozenset(USERS)

BOOLS = frozenset({"true", "false"})
INTS = frozenset({"zero", "one", "int10"})
NUMBERS = INTS | {"float", "float10"}
STRINGS = frozenset({"str10", "strtrue", "str", "strpad"})

v = schema.users.c.attributes["v"]
w = schema.users.c.attributes["w"]
nested = schema.users.c.attributes["v"]["a"]
path = schema.users.c.attributes[("v", "b")]

Predicate = Callable[[], sa.ColumnElement[bool]]

# label -> (predicate, the members it must select on every store)
TABLE: dict[str, tuple[Predicate, frozenset[str]]] = {
    # as_boolean: only JSON true and false are booleans (not 0/1, not "true"); Core itself
    # refuses < and > against True/False, so IS and IS NOT stand in for them
    "bool == False": (lambda: v.as_boolean() == False, frozenset({"false"})),  # noqa: E712 - SQL
    "bool == True": (lambda: v.as_boolean() == True, frozenset({"true"})),  # noqa: E712 - SQL
    "bool != False": (lambda: v.as_boolean() != False, frozenset({"true"})),  # noqa: E712 - SQL
    "bool IS True": (lambda: v.as_boolean().is_(True), frozenset({"true"})),
    "bool IS NOT True": (lambda: v.as_boolean().is_not(True), ALL - {"true"}),
    "bool IS NULL": (lambda: v.as_boolean().is_(None), ALL - BOOLS),
    "bool IS NOT NULL": (lambda: v.as_boolean().is_not(None), BOOLS),
    "bool alone": (lambda: v.as_boolean(), frozenset({"true"})),
    "NOT bool": (lambda: sa.not_(v.as_boolean()), frozenset({"false"})),
    # as_integer: JSON integers only (not 10.0, not "10", not true)
    "int == 10": (lambda: v.as_integer() == 10, frozenset({"int10"})),
    "int == 1": (lambda: v.as_integer() == 1, frozenset({"one"})),
    "w int == 10": (lambda: w.as_integer() == 10, frozenset({"one"})),  # same SQL, other key
    "int != 10": (lambda: v.as_integer() != 10, frozenset({"zero", "one"})),
    "int < 5": (lambda: v.as_integer() < 5, frozenset({"zero", "one"})),
    "int > 5": (lambda: v.as_integer() > 5, frozenset({"int10"})),
    "int IS NULL": (lambda: v.as_integer().is_(None), ALL - INTS),
    "int IS NOT NULL": (lambda: v.as_integer().is_not(None), INTS),
    # as_float: any JSON number
    "float == 10": (lambda: v.as_float() == 10.0, frozenset({"int10", "float10"})),
    "float == 2.5": (lambda: v.as_float() == 2.5, frozenset({"float"})),
    "float != 10": (lambda: v.as_float() != 10.0, frozenset({"zero", "one", "float"})),
    "float < 5": (lambda: v.as_float() < 5.0, frozenset({"zero", "one", "float"})),
    "float > 2": (lambda: v.as_float() > 2.0, frozenset({"float", "int10", "float10"})),
    "float IS NULL": (lambda: v.as_float().is_(None), ALL - NUMBERS),
    "float IS NOT NULL": (lambda: v.as_float().is_not(None), NUMBERS),
    # as_string: JSON strings only, compared byte for byte (trailing blanks count)
    "str == '10'": (lambda: v.as_string() == "10", frozenset({"str10"})),
    "str == 'pro'": (lambda: v.as_string() == "pro", frozenset({"str"})),
    "str == 'true'": (lambda: v.as_string() == "true", frozenset({"strtrue"})),
    "str != 'pro'": (lambda: v.as_string() != "pro", frozenset({"str10", "strtrue", "strpad"})),
    "str < 'p'": (lambda: v.as_string() < "p", frozenset({"str10"})),
    "str > 'p'": (lambda: v.as_string() > "p", frozenset({"str", "strpad", "strtrue"})),
    "str IS NULL": (lambda: v.as_string().is_(None), ALL - STRINGS),
    "str IS NOT NULL": (lambda: v.as_string().is_not(None), STRINGS),
    # nested keys and paths follow the same rule
    "v.a int == 1": (lambda: nested.as_integer() == 1, frozenset({"obj"})),
    "v.a int IS NULL": (lambda: nested.as_integer().is_(None), ALL - {"obj"}),
    "v.a str == '1'": (lambda: nested.as_string() == "1", frozenset()),
    "v,b str == 'x'": (lambda: path.as_string() == "x", frozenset({"obj"})),
    "v,b str IS NOT NULL": (lambda: path.as_string().is_not(None), frozenset({"obj"})),
}


async def _add_users(store: Store) -> None:
    async with store.begin() as conn:
        await conn.execute(sa.insert(schema.users), [
            {"id": uid, "attributes": attrs, "created_at": NOW, "updated_at": NOW}
            for uid, attrs in USERS.items()])


async def _members(url: str) -> dict[str, frozenset[str]]:
    store = Store.open(url)
    try:
        await store.migrate()
        await _add_users(store)
        out: dict[str, frozenset[str]] = {}
        async with store.connect() as conn:
            for label, (predicate, _expected) in TABLE.items():
                rows = await conn.execute(sa.select(schema.users.c.id).where(predicate()))
                out[label] = frozenset(str(r[0]) for r in rows)
        return out
    finally:
        await store.close()


async def test_json_accessors_select_the_same_stated_members_on_sqlite_and_mariadb(
        sqlite_url: str, mariadb_url: str) -> None:
    """Every predicate of the table selects its stated members on both stores."""
    on_sqlite = await _members(sqlite_url)
    on_mariadb = await _members(mariadb_url)
    expected = {label: members for label, (_p, members) in TABLE.items()}
    differ = {label: (sorted(on_sqlite[label]), sorted(on_mariadb[label]))
              for label in TABLE if on_sqlite[label] != on_mariadb[label]}
    assert differ == {}, "SQLite and MariaDB disagree (sqlite, mariadb)"
    assert on_sqlite == expected
    assert on_mariadb == expected


async def test_a_segment_over_values_of_every_type_refreshes_and_evaluates(
        store: Store) -> None:
    """A refresh is INSERT ... SELECT, which MariaDB's strict mode fails on a cast warning
    (the string "pro" cast to an integer): the segment reads only the integers instead."""
    app = Segflow()

    @app.segment("ten")
    def ten() -> sa.Select[tuple[str]]:
        return sa.select(schema.users.c.id).where(v.as_integer() == 10)

    seg = compile_segment(app.segments["ten"])
    await _add_users(store)
    async with store.begin() as conn:
        _before, _after, entered, exited = await refresh_diff(conn, seg, NOW)
    assert (entered, exited) == (1, 0)
    async with store.begin() as conn:  # the incremental path: nothing changes
        assert await apply_batch(conn, seg, sorted(USERS), NOW + dt.timedelta(1), None) == []
        members = (await conn.execute(sa.select(schema.segment_members.c.user_id))).all()
    assert [str(m[0]) for m in members] == ["int10"]
