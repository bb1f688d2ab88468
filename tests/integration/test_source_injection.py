"""Data sources on real MariaDB and PostgreSQL customer databases: a placeholder's value is
data in every position the parser accepts, the positions it refuses are refused before
anything is sent, read-only holds per query on a pooled connection, any value converts,
and a quoted placeholder meets a date or boolean column as the literal it replaces."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from customer_db import source_for

from segflowd.errors import SourceError
from segflowd.placeholders import parse
from segflowd.sourcedefs import DataSourceDef
from segflowd.sources.datasources import DataSources
from segflowd.sources.pools import Source, StaticSources

pytestmark = pytest.mark.anyio

PAYLOADS = [
    " OR 1=1 OR ",
    "' OR '1'='1",
    "x'; DROP TABLE items; SELECT '",
    "'; DROP TABLE items; --",
    "\\'; DROP TABLE items; -- ",
    "%' OR 1=1 #",
    "1; DROP TABLE items",
    "*/ DROP TABLE items /*",
    "$$; DROP TABLE items; $$",
    "\" OR \"\"=\"",
]
# Every position a placeholder may take, per dialect: a payload must match no item.
ALLOWED = {
    "mysql": [
        ("bare", "SELECT COUNT(*) AS n FROM items WHERE name = <%= q %>"),
        ("quoted literal", "SELECT COUNT(*) AS n FROM items WHERE name = '<%= q %>'"),
        ("inside CONCAT", "SELECT COUNT(*) AS n FROM items "
                          "WHERE name LIKE CONCAT('%', <%= q %>, '%')"),
    ],
    "postgresql": [
        ("bare", "SELECT COUNT(*) AS n FROM items WHERE name = <%= q %>"),
        ("quoted literal", "SELECT COUNT(*) AS n FROM items WHERE name = '<%= q %>'"),
        ("inside ||", "SELECT COUNT(*) AS n FROM items WHERE name LIKE '%' || <%= q %> || '%'"),
    ],
}
# Positions that would paste the value into SQL text: refused with these messages.
REFUSED = [
    ("inside a literal", "SELECT COUNT(*) AS n FROM items WHERE name LIKE '%<%= q %>%'",
     "placeholder inside a string literal"),
    ("inside a line comment", "SELECT COUNT(*) AS n FROM items -- <%= q %>\n",
     "placeholder inside a comment"),
    ("inside a block comment", "SELECT COUNT(*) AS n /* <%= q %> */ FROM items",
     "placeholder inside a comment"),
    ("inside a quoted identifier", "SELECT COUNT(*) AS n FROM items WHERE `<%= q %>` = 1",
     "placeholder inside a (quoted identifier|string literal)"),
    ("glued to a word", "SELECT COUNT(*) AS n FROM items WHERE name = <%= q %>x",
     "directly followed by 'x'"),
    ("two statements", "SELECT COUNT(*) AS n FROM items WHERE name = <%= q %>; SELECT 1",
     "more than one statement"),
]


def _admin(url: str) -> sa.Engine:
    u = sa.engine.make_url(url)
    sync = "mysql+pymysql" if u.drivername.startswith("mysql") else "postgresql+psycopg2"
    return sa.create_engine(u.set(drivername=sync), poolclass=sa.pool.NullPool)


def _seed(url: str) -> None:
    with _admin(url).begin() as conn:
        conn.exec_driver_sql("CREATE TABLE items (id integer PRIMARY KEY, name varchar(100))")
        conn.exec_driver_sql("INSERT INTO items VALUES (1, 'apple'), (2, 'pear'), (3, 'fig')")


def _items(url: str) -> int:
    with _admin(url).connect() as conn:
        return int(conn.exec_driver_sql("SELECT COUNT(*) FROM items").scalar_one())


@pytest.fixture(params=["mysql", "postgresql"])
def customer(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(dialect, url) of a fresh customer database holding three items."""
    url = str(request.getfixturevalue("mariadb_url" if request.param == "mysql"
                                      else "postgres_url"))
    _seed(url)
    return request.param, url


@pytest.fixture
async def src(customer: tuple[str, str]) -> AsyncIterator[Source]:
    s = source_for("shop", customer[1], pool_size=1)  # one connection: one session
    try:
        yield s
    finally:
        await s.close()


async def test_hostile_values_are_data_in_every_allowed_position(
        customer: tuple[str, str], src: Source) -> None:
    dialect, url = customer
    for position, sql in ALLOWED[dialect]:
        assert await src.fetch(sql, {"q": "pear"}, what=position) == [{"n": 1}], position
        for payload in PAYLOADS:
            rows = await src.fetch(sql, {"q": payload}, what=position)
            assert rows == [{"n": 0}], (position, payload)
    assert _items(url) == 3  # nothing dropped, nothing changed


@pytest.mark.parametrize(("position", "sql", "message"), REFUSED,
                         ids=[r[0] for r in REFUSED])
async def test_placeholder_positions_that_would_paste_text_are_refused_before_sending(
        customer: tuple[str, str], src: Source, position: str, sql: str,
        message: str) -> None:
    dialect, url = customer
    if dialect == "postgresql" and "`" in sql:
        sql = sql.replace("`", '"')  # PostgreSQL quotes names with "; MySQL reads a string
    with pytest.raises(SourceError, match=message):
        await src.fetch(sql, {"q": "x'; DROP TABLE items; SELECT '"}, what=position)
    with pytest.raises(ValueError, match=message):
        parse(sql)  # the same error at app load, before the dialect is known
    assert src.queries == 0  # refused before a connection was taken
    assert _items(url) == 3


async def test_like_literal_payload_no_longer_returns_every_row_or_drops_the_table(
        customer: tuple[str, str], src: Source) -> None:
    """The issue's exploit: LIKE '%<%= q %>%' with ' OR 1=1 OR ' / '; DROP TABLE'."""
    _dialect, url = customer
    sql = "SELECT id FROM items WHERE name LIKE '%<%= q %>%'"
    for payload in (" OR 1=1 OR ", "x'; DROP TABLE items; SELECT '"):
        with pytest.raises(SourceError, match=r"CONCAT\('%', <%= q %>, '%'\)|\|\|"):
            await src.fetch(sql, {"q": payload}, what="audience")
    assert _items(url) == 3


async def test_mysql_source_connections_refuse_multiple_statements(
        mariadb_url: str) -> None:
    _seed(mariadb_url)
    s = source_for("shop", mariadb_url)
    try:
        async with s.engine.connect() as conn:
            with pytest.raises(sa.exc.ProgrammingError):
                await conn.exec_driver_sql("SELECT 1; SELECT 2")
    finally:
        await s.close()


async def test_mysql_read_write_set_by_one_query_does_not_reach_the_next(
        mariadb_url: str) -> None:
    _seed(mariadb_url)
    s = source_for("shop", mariadb_url, pool_size=1)
    try:
        with contextlib.suppress(SourceError):  # it returns no rows; it ran all the same
            await s.fetch("SET SESSION TRANSACTION READ WRITE", {}, what="statement")
        with pytest.raises(SourceError, match="READ ONLY"):
            await s.fetch("DROP TABLE items", {}, what="statement")
        with contextlib.suppress(SourceError):
            await s.fetch("SET SESSION tx_read_only = 0", {}, what="statement")
        with pytest.raises(SourceError, match="READ ONLY"):
            await s.fetch("DELETE FROM items", {}, what="statement")
    finally:
        await s.close()
    assert _items(mariadb_url) == 3


async def test_mysql_time_limit_lifted_by_one_query_is_back_for_the_next(
        mariadb_url: str) -> None:
    _seed(mariadb_url)
    s = source_for("shop", mariadb_url, pool_size=1, statement_timeout=1)
    try:
        with contextlib.suppress(SourceError):
            await s.fetch("SET SESSION max_statement_time = 0", {}, what="statement")
        with pytest.raises(SourceError, match="max_statement_time"):
            await s.fetch("SELECT SLEEP(3) AS x", {}, what="slow")
    finally:
        await s.close()


async def test_postgres_session_state_does_not_outlive_its_query(postgres_url: str) -> None:
    """An advisory lock taken by one query is released when the connection is returned."""
    _seed(postgres_url)
    s = source_for("crm", postgres_url, pool_size=1)
    try:
        await s.fetch("SELECT pg_advisory_lock(4242) AS x", {}, what="lock")
        with _admin(postgres_url).connect() as other:
            got = other.exec_driver_sql("SELECT pg_try_advisory_lock(4242)").scalar_one()
        assert got is True
        assert await s.fetch("SELECT 1 AS one", {}, what="after") == [{"one": 1}]
    finally:
        await s.close()


def _defs(audience: str, discovery: str | None = None) -> dict[str, DataSourceDef]:
    return {"d": DataSourceDef(
        name="d", source="crm", discovery=parse(discovery) if discovery else None,
        audience=parse(audience), preload=None, origin="test")}


async def test_numbers_json_cannot_hold_become_strings_not_a_crash(postgres_url: str) -> None:
    s = source_for("crm", postgres_url)
    ds = DataSources(StaticSources([s]), _defs(
        "SELECT 1 AS profile_id, 'a@example.com' AS email",
        "SELECT 'Infinity'::numeric AS a, '-Infinity'::numeric AS b, 'NaN'::numeric AS c, "
        "'Infinity'::float8 AS d, '1.5e400'::numeric AS e, "
        "'123456789012345678901234567890'::numeric AS f, 2.5::numeric AS g"), {})
    try:
        rows = await ds.discover("d")
    finally:
        await s.close()
    e = rows[0].pop("e")
    assert isinstance(e, str)
    assert decimal.Decimal(e) == decimal.Decimal("1.5e400")  # its decimal text, exact
    assert rows == [{"a": "Infinity", "b": "-Infinity", "c": "NaN", "d": "Infinity",
                     "f": "123456789012345678901234567890", "g": 2.5}]


async def test_a_consumer_that_raises_returns_the_connection_at_once(
        postgres_url: str) -> None:
    _seed(postgres_url)
    s = source_for("crm", postgres_url, pool_size=1)
    ds = DataSources(StaticSources([s]), _defs("SELECT id AS profile_id FROM items"), {})
    try:
        with pytest.raises(SourceError, match="must return profile_id plus email"):
            async for _batch in ds.audience("d", {}):
                pass
        assert s.statistics().pool_checked_out == 0
    finally:
        await s.close()


async def test_postgres_quoted_placeholder_meets_date_and_boolean_columns(
        postgres_url: str) -> None:
    with _admin(postgres_url).begin() as conn:
        conn.exec_driver_sql("CREATE TABLE visits (day date, paid boolean, at timestamp)")
        conn.exec_driver_sql("INSERT INTO visits VALUES ('2024-05-01', true, "
                             "'2024-05-01 10:00'), ('2024-05-02', false, '2024-05-02 11:00')")
    s = source_for("crm", postgres_url)
    try:
        day = await s.fetch("SELECT paid FROM visits WHERE day = '<%= day %>'",
                            {"day": "2024-05-02"}, what="date")
        assert day == [{"paid": False}]
        paid = await s.fetch("SELECT day, at FROM visits WHERE paid = '<%= paid %>'",
                             {"paid": "true"}, what="boolean")
        assert paid == [{"day": dt.date(2024, 5, 1), "at": dt.datetime(2024, 5, 1, 10)}]
        stamp = await s.fetch("SELECT day FROM visits WHERE at < '<%= at %>' AND paid = "
                              "<%= paid %>", {"at": "2024-05-02", "paid": True}, what="ts")
        assert stamp == [{"day": dt.date(2024, 5, 1)}]
    finally:
        await s.close()
