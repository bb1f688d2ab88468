"""The store on real SQLite and MariaDB: migrations, refusal of newer schemas, retries."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys

import anyio
import pytest
import sqlalchemy as sa

from segflowd import schema
from segflowd.errors import SchemaTooNew, StoreError, StoreUnavailable
from segflowd.store import Store, is_unavailable

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 1, 1, 12, 0, 0)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_migrate_from_empty_creates_every_table(store_url: str) -> None:
    s = Store.open(store_url)
    try:
        assert await s.read_schema_version() is None
        before = await s.migrate()
        assert before == 0
        assert await s.read_schema_version() == schema.SCHEMA_VERSION
        async with s.connect() as conn:
            names = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
        assert set(schema.metadata.tables) <= names
        assert s.statistics().schema_version == schema.SCHEMA_VERSION
    finally:
        await s.close()


async def test_migrate_twice_is_a_no_op(store: Store) -> None:
    assert await store.migrate() == schema.SCHEMA_VERSION
    assert await store.read_schema_version() == schema.SCHEMA_VERSION


async def test_newer_schema_is_refused_with_a_clear_message(store: Store) -> None:
    async with store.begin() as conn:
        await conn.execute(sa.update(schema.schema_version).values(version=999))
    with pytest.raises(SchemaTooNew) as info:
        await store.migrate()
    assert "version 999, newer than this segflowd knows" in str(info.value)
    with pytest.raises(SchemaTooNew):
        await store.wait_ready(retry_max=0.01)  # not retried: retrying cannot help


async def test_foreign_tables_without_version_are_not_adopted(store_url: str) -> None:
    s = Store.open(store_url)
    try:
        async with s.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY)"))
        with pytest.raises(StoreError, match="it is not a Segflow store"):
            await s.migrate()
    finally:
        await s.close()


async def test_users_and_events_round_trip_json_and_times(store: Store) -> None:
    async with store.begin() as conn:
        await conn.execute(sa.insert(schema.users).values(
            id="u1", attributes={"name": "Ann", "plan": "pro"}, created_at=NOW, updated_at=NOW))
        await conn.execute(sa.insert(schema.events).values(
            user_id="u1", name="purchase", attributes={"amount": 12.5}, created_at=NOW,
            received_at=NOW))
    async with store.connect() as conn:
        user = (await conn.execute(sa.select(schema.users).where(schema.users.c.id == "u1"))).one()
        amount = schema.events.c.attributes["amount"].as_float()
        total = (await conn.execute(sa.select(sa.func.sum(amount)))).scalar()
    assert user.attributes == {"name": "Ann", "plan": "pro"}
    assert user.created_at == NOW
    assert total == 12.5


async def test_insert_ignore_skips_duplicates_on_both_dialects(store: Store) -> None:
    row = {"id": "u1", "attributes": {}, "created_at": NOW, "updated_at": NOW}
    async with store.begin() as conn:
        await conn.execute(store.insert_ignore(schema.users).values(**row))
        await conn.execute(store.insert_ignore(schema.users).values(
            **{**row, "attributes": {"x": 1}}))
    async with store.connect() as conn:
        rows = (await conn.execute(sa.select(schema.users.c.attributes))).all()
    assert [r[0] for r in rows] == [{}]


async def test_ping_and_statistics(store: Store) -> None:
    assert await store.ping() is True
    st = store.statistics()
    assert st.healthy is True
    assert st.last_ping_ms is not None
    assert st.dialect in ("sqlite", "mysql", "mariadb")


@pytest.mark.mariadb
async def test_unreachable_mariadb_is_retried_with_backoff_then_gives_up_when_cancelled() -> None:
    s = Store.open(f"mysql+aiomysql://u:secret@127.0.0.1:{closed_port()}/x", connect_timeout=1)
    retries: list[tuple[int, float, str]] = []
    try:
        with anyio.move_on_after(1.5):
            await s.wait_ready(retry_max=0.2,
                               on_retry=lambda a, d, r: retries.append((a, d, r)))
        assert len(retries) >= 2
        assert [a for a, _, _ in retries][:2] == [1, 2]
        assert retries[0][1] == pytest.approx(0.2)  # the cap applies from the first retry
        assert "secret" not in s.safe_url
        with pytest.raises(StoreUnavailable):
            async with s.connect():
                pass
        assert await s.ping(1.0) is False
    finally:
        await s.close()


async def test_backoff_doubles_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store.open(f"mysql+aiomysql://u@127.0.0.1:{closed_port()}/x", connect_timeout=1)
    delays: list[float] = []

    async def no_sleep(_: float) -> None:
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr("segflowd.store.anyio.sleep", no_sleep)
    try:
        with anyio.CancelScope() as scope:
            def on_retry(attempt: int, delay: float, reason: str) -> None:
                delays.append(delay)
                if len(delays) >= 6:
                    scope.cancel()  # a store that never answers: stop watching here

            await s.wait_ready(retry_max=4.0, on_retry=on_retry)
    finally:
        await s.close()
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_is_unavailable_tells_outages_from_bad_sql() -> None:
    assert is_unavailable(ConnectionRefusedError())
    assert is_unavailable(TimeoutError())
    assert is_unavailable(StoreUnavailable("x"))
    bad_sql = sa.exc.ProgrammingError("SELECT", {}, Exception(1064, "syntax"))
    assert not is_unavailable(bad_sql)
    gone = sa.exc.OperationalError("SELECT", {}, Exception(2003, "Can't connect"))
    assert is_unavailable(gone)


@pytest.mark.mariadb
async def test_store_works_through_the_asyncmy_driver_too(mariadb_url: str) -> None:
    url = mariadb_url.replace("mysql+aiomysql://", "mysql+asyncmy://")
    store = Store.open(url)
    try:
        assert await store.migrate() == 0
        assert await store.read_schema_version() == schema.SCHEMA_VERSION
        assert await store.ping() is True
    finally:
        await store.close()


_CANCELLED_QUERY = """
import sys, time
import anyio, sqlalchemy as sa
from segflowd.store import Store

SLOW = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000000)"
        " SELECT count(*) FROM c")

async def main():
    store = Store.open(sys.argv[1])
    await store.migrate()
    with anyio.move_on_after(0.2):  # cancelled while the query runs in aiosqlite's thread
        async with store.connect() as conn:
            await conn.execute(sa.text(SLOW))
    await store.close()

anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
print("exited")
"""


def test_a_query_cancelled_mid_way_on_sqlite_does_not_hang_the_process_at_exit(
        sqlite_url: str) -> None:
    # aiosqlite 0.22 + SQLAlchemy: the connection's shielded close waited forever for a
    # thread that had already stopped, and asyncio.run waited for it at exit.
    done = subprocess.run([sys.executable, "-c", _CANCELLED_QUERY, sqlite_url],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("exited")
