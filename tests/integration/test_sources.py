"""Data sources on a real customer database: DirectFlow's example queries on PostgreSQL as
written, read-only sessions on PostgreSQL and MariaDB, bound placeholders, clear errors."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from customer_db import (
    AUDIENCE,
    DATES,
    DISCOVERY,
    INJECTION,
    JSON_OPS,
    PRELOAD,
    PREMIUM,
    WINDOW,
    WINDOW_WRAPPED,
    seed_postgres,
    source_for,
)

from segflowd.errors import PlaceholderError, SourceError
from segflowd.sources.pools import Source

pytestmark = pytest.mark.anyio

WRITES = [
    ("INSERT", "INSERT INTO communities VALUES (9, 'x', 1, 'free', true)"),
    ("UPDATE", "UPDATE users SET email = 'owned@example.com'"),
    ("DELETE", "DELETE FROM memberships"),
    ("CREATE TABLE", "CREATE TABLE stolen (a integer)"),
    ("DROP TABLE", "DROP TABLE user_profiles"),
]


@pytest.fixture
async def crm(postgres_url: str) -> AsyncIterator[Source]:
    seed_postgres(postgres_url)
    # The url as a customer writes it: plain postgresql://, not the driver's name.
    src = source_for("crm", postgres_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        yield src
    finally:
        await src.close()


async def test_discovery_query_as_written_lists_active_communities_by_size(crm: Source) -> None:
    rows = await crm.fetch(DISCOVERY, {}, what="discovery")
    assert [(r["id"], r["community_name"], r["user_count"]) for r in rows] == [
        (1, "Gardeners", 3), (2, "Cyclists", 1)]


async def test_audience_query_binds_quoted_community_id_from_text_or_integer(
        crm: Source) -> None:
    as_text = await crm.fetch(AUDIENCE, {"community_id": "1"}, what="audience")
    as_int = await crm.fetch(AUDIENCE, {"community_id": 1}, what="audience")
    assert as_text == as_int
    assert sorted(r["profile_id"] for r in as_text) == ["u-ada", "u-bob"]  # cy has no email
    assert as_text[0].keys() == {"profile_id", "email", "phone", "first_name", "last_name"}


async def test_preload_query_returns_the_profiles_columns(crm: Source) -> None:
    (row,) = await crm.fetch(PRELOAD, {"profile_id": "u-ada"}, what="preload")
    assert row["plan_name"] == "Pro yearly"
    assert row["total_purchases"] == 12
    assert row["preferred_language"] == "fr"
    assert isinstance(row["last_login_at"], dt.datetime)


async def test_premium_plan_condition_yields_result_column(crm: Source) -> None:
    ada = await crm.fetch(PREMIUM, {"profile_id": "u-ada"}, what="condition")
    bob = await crm.fetch(PREMIUM, {"profile_id": "u-bob"}, what="condition")
    nobody = await crm.fetch(PREMIUM, {"profile_id": "u-nobody"}, what="condition")
    assert ada == [{"result": True}]
    assert bob == [{"result": False}]
    assert nobody == []


async def test_json_operators_arrow_double_arrow_and_key_exists_work(crm: Source) -> None:
    rows = {r["profile_id"]: r for r in await crm.fetch(JSON_OPS, {}, what="audience")}
    assert set(rows) == {"u-ada", INJECTION}  # only they have a 'preferences' key
    assert rows["u-ada"]["language"] == "fr"
    assert rows["u-ada"]["notifications_enabled"] is True
    assert rows[INJECTION]["notifications_enabled"] is None


async def test_date_trunc_and_interval_select_recent_logins_by_month(crm: Source) -> None:
    rows = await crm.fetch(DATES, {}, what="audience")
    assert sorted(r["profile_id"] for r in rows) == sorted(["u-ada", "u-cy", INJECTION])
    for r in rows:
        month = r["login_month"]
        assert isinstance(month, dt.datetime)
        assert (month.day, month.hour, month.minute) == (1, 0, 0)


async def test_window_example_fails_with_postgres_message_naming_the_source(
        crm: Source) -> None:
    with pytest.raises(SourceError) as info:
        await crm.fetch(WINDOW, {}, what="audience query of data source 'ranked'")
    message = str(info.value)
    assert "'crm'" in message
    assert 'column "user_rank" does not exist' in message
    assert info.value.source == "crm"


async def test_window_example_wrapped_in_a_subquery_ranks_per_plan(crm: Source) -> None:
    rows = await crm.fetch(WINDOW_WRAPPED, {}, what="audience")
    ranks = {r["profile_id"]: r["user_rank"] for r in rows}
    assert ranks == {"u-ada": 1, "u-bob": 2, "u-cy": 1, INJECTION: 2}


@pytest.mark.parametrize(("kind", "sql"), WRITES, ids=[k for k, _ in WRITES])
async def test_write_statements_fail_on_a_postgres_source(crm: Source, postgres_url: str,
                                                         kind: str, sql: str) -> None:
    with pytest.raises(SourceError, match="read-only transaction"):
        await crm.fetch(sql, {}, what="statement")
    rows = await crm.fetch("SELECT count(*) AS n FROM memberships", {}, what="count")
    assert rows == [{"n": 4}]  # nothing was changed


async def test_write_fails_even_after_a_query_turns_the_sessions_default_off(
        crm: Source, postgres_url: str) -> None:
    """Every query also runs in a READ ONLY transaction, whatever the session default."""
    src = source_for("one", postgres_url, pool_size=1)  # one connection: the same session
    try:
        await src.fetch("SELECT set_config('default_transaction_read_only', 'off', false) "
                        "AS x", {}, what="statement")
        with pytest.raises(SourceError, match="read-only transaction"):
            await src.fetch("INSERT INTO communities VALUES (9, 'x', 1, 'free', true)", {},
                            what="statement")
    finally:
        await src.close()
    rows = await crm.fetch("SELECT count(*) AS n FROM communities", {}, what="count")
    assert rows == [{"n": 3}]


async def test_injection_payload_in_a_placeholder_is_matched_as_plain_data(
        crm: Source) -> None:
    rows = await crm.fetch(PRELOAD, {"profile_id": INJECTION}, what="preload")
    assert rows == [{"plan_name": "Free", "last_login_at": None, "total_purchases": 0,
                     "preferred_language": "de"}]
    none = await crm.fetch(PRELOAD, {"profile_id": "u-nobody' OR '1'='1"}, what="preload")
    assert none == []  # the payload matched nothing: it was a value, not SQL


async def test_missing_placeholder_value_is_an_error_naming_it(crm: Source) -> None:
    with pytest.raises(PlaceholderError, match=r"<%= profile_id %>"):
        await crm.fetch(PRELOAD, {"user": "u-ada"}, what="preload")


async def test_statement_timeout_cancels_a_slow_query(postgres_url: str) -> None:
    src = source_for("slow", postgres_url, statement_timeout=0.2)
    try:
        with pytest.raises(SourceError, match="statement timeout"):
            await src.fetch("SELECT pg_sleep(5)", {}, what="query")
    finally:
        await src.close()


async def test_pooled_connections_the_database_closed_are_replaced_without_an_error(
        crm: Source, postgres_url: str) -> None:
    assert await crm.fetch(PREMIUM, {"profile_id": "u-ada"}, what="condition", limit=1)
    assert len(await crm.fetch(AUDIENCE, {"community_id": 1}, what="audience")) == 2
    # The database drops every segflowd session (a restart, a proxy's idle timeout).
    admin = sa.create_engine(
        sa.engine.make_url(postgres_url).set(drivername="postgresql+psycopg2"),
        poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        killed = conn.execute(sa.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'segflowd'")).scalar()
    admin.dispose()
    assert killed >= 1
    (row,) = await crm.fetch(PREMIUM, {"profile_id": "u-ada"}, what="condition", limit=1)
    assert row["result"] is True
    assert len(await crm.fetch(AUDIENCE, {"community_id": 1}, what="audience")) == 2
    assert crm.statistics().errors == 0


async def test_unreachable_source_is_a_clear_error_naming_it() -> None:
    src = source_for("gone", "postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout=1)
    try:
        with pytest.raises(SourceError, match=r"data source 'gone' .* is unreachable"):
            await src.fetch("SELECT 1 AS one", {}, what="query")
        assert src.statistics().errors == 1
    finally:
        await src.close()


@pytest.fixture
def shop_url(mariadb_url: str) -> str:
    """A MariaDB customer database with one table."""
    engine = sa.create_engine(sa.engine.make_url(mariadb_url).set(drivername="mysql+pymysql"),
                              poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id varchar(64) PRIMARY KEY, "
                             "email varchar(200), plan varchar(20))")
        conn.exec_driver_sql("INSERT INTO customers VALUES ('c1', 'c1@example.com', 'pro'), "
                             "('x'' OR ''1''=''1', 'm@example.com', 'free')")
    engine.dispose()
    return mariadb_url.replace("mysql+aiomysql://", "mysql://")


async def test_mysql_source_reads_and_refuses_every_write(shop_url: str) -> None:
    src = source_for("shop", shop_url)
    try:
        rows = await src.fetch("SELECT id AS profile_id, email FROM customers "
                               "WHERE plan = '<%= plan %>'", {"plan": "pro"}, what="audience")
        assert rows == [{"profile_id": "c1", "email": "c1@example.com"}]
        for _kind, sql in [("INSERT", "INSERT INTO customers VALUES ('c2', NULL, 'x')"),
                           ("UPDATE", "UPDATE customers SET plan = 'free'"),
                           ("DELETE", "DELETE FROM customers"),
                           ("CREATE TABLE", "CREATE TABLE stolen (a int)"),
                           ("DROP TABLE", "DROP TABLE customers")]:
            with pytest.raises(SourceError, match="READ ONLY"):
                await src.fetch(sql, {}, what="statement")
        count = await src.fetch("SELECT COUNT(*) AS n FROM customers", {}, what="count")
        assert count == [{"n": 2}]
        payload = await src.fetch("SELECT email FROM customers WHERE id = '<%= id %>'",
                                  {"id": INJECTION}, what="preload")
        assert payload == [{"email": "m@example.com"}]
    finally:
        await src.close()
