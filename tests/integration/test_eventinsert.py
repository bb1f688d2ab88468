"""The committer's driver-level events INSERT stores exactly what SQLAlchemy's would."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from segflowd import schema
from segflowd.ingest.eventinsert import COLUMNS, MAX_ROWS, EventInserter
from segflowd.store import Store, is_unavailable

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, 123456)
ATTRIBUTES = [
    {}, {"plan": "pro", "n": 3, "ratio": 0.1, "ok": True, "none": None},
    {"nested": {"list": [1, "two", {"three": 3.5}]}, "big": 2**70},
    {"unicode": "é中😀 \\ \" ' %s %(x)s ?", "emoji 🎉": "k"},
]


def _rows(prefix: str) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for i, attrs in enumerate(ATTRIBUTES):
        out.append((f"u{i}", None if i % 2 else f"anon-{i}", f"{prefix}.e{i}", attrs,
                    f"{prefix}-k{i}" if i != 2 else None,
                    NOW - dt.timedelta(days=i, microseconds=i), NOW))
    return out


def _comparable(row: sa.Row[object], prefix: str) -> tuple[object, ...]:
    return (row.user_id, row.anonymous_id, row.name.removeprefix(prefix),
            row.attributes, (row.dedupe_key or "").removeprefix(prefix), row.created_at,
            row.received_at)


async def _stored(store: Store, prefix: str) -> list[sa.Row[object]]:
    ev = schema.events
    async with store.connect() as conn:
        return list(await conn.execute(
            sa.select(ev).where(ev.c.name.startswith(prefix)).order_by(ev.c.id)))


async def test_the_driver_path_stores_the_same_rows_as_sqlalchemy(store: Store) -> None:
    ev = schema.events
    async with store.begin() as conn:
        inserter = EventInserter(store, conn.dialect)
        assert inserter.supported
        fast, existing = await inserter.insert(conn, _rows("fast"))
        await conn.execute(store.insert_ignore(ev),
                           [dict(zip(COLUMNS, row, strict=True)) for row in _rows("slow")])
    stored_fast, stored_slow = await _stored(store, "fast"), await _stored(store, "slow")
    assert [_comparable(r, "fast") for r in stored_fast] == \
        [_comparable(r, "slow") for r in stored_slow]
    assert sorted(fast) == sorted((r.id, r.dedupe_key) for r in stored_fast)
    assert existing == {}
    assert stored_fast[1].attributes == ATTRIBUTES[1]
    assert stored_fast[0].created_at == NOW


async def test_stored_keys_are_skipped_and_only_new_rows_come_back(store: Store) -> None:
    async with store.begin() as conn:
        inserter = EventInserter(store, conn.dialect)
        first, _ = await inserter.insert(conn, _rows("dup"))
    async with store.begin() as conn:
        again, existing = await inserter.insert(conn, _rows("dup"))
    keyless = [row_id for row_id, key in again]
    assert len(first) == len(ATTRIBUTES)
    assert len(again) == 1  # the row without a key is new each time; the keyed ones are not
    assert all(row_id not in dict(first) for row_id in keyless)
    assert len(await _stored(store, "dup")) == len(ATTRIBUTES) + 1
    # The skipped keys come back with the ids they were stored under the first time.
    assert existing == {key: row_id for row_id, key in first if key is not None}


async def test_alone_the_insert_is_a_transaction_of_its_own(store: Store) -> None:
    async with store.connect() as conn:
        inserter = EventInserter(store, conn.dialect)
        if not inserter.commits_alone:
            assert store.dialect != "sqlite"  # MySQL: BEGIN costs no trip of its own
            with pytest.raises(RuntimeError):
                await inserter.insert(conn, _rows("alone"), alone=True)
            return
        first, existing = await inserter.insert(conn, _rows("alone"), alone=True)
        assert existing == {}
        assert not conn.in_transaction()
        again, existing = await inserter.insert(conn, _rows("alone"), alone=True)
        assert not conn.in_transaction()
        # Committed: seen from another connection, which can write (BEGIN IMMEDIATE) while
        # this one is still open: no lock is left held.
        stored = await _stored(store, "alone")
        async with store.begin() as other:
            await other.execute(sa.update(schema.events).where(schema.events.c.id == stored[0].id)
                                .values(name="alone.e0-written"))
    assert sorted(first + again) == sorted((r.id, r.dedupe_key) for r in stored)
    assert existing == {key: row_id for row_id, key in first if key is not None}


async def test_more_rows_than_one_statement_holds_all_come_back_in_order(store: Store) -> None:
    rows = [("u", None, "many.e", {"i": i}, None, NOW, NOW) for i in range(MAX_ROWS + 7)]
    async with store.begin() as conn:
        got, _ = await EventInserter(store, conn.dialect).insert(conn, rows)
    stored = await _stored(store, "many.")
    assert [row_id for row_id, _ in got] == [r.id for r in stored]
    assert [r.attributes["i"] for r in stored] == list(range(MAX_ROWS + 7))


async def test_a_driver_error_is_the_sqlalchemy_exception_and_nothing_is_written(
        sqlite_url: str) -> None:
    # (MariaDB's INSERT IGNORE turns such errors into warnings: SQLAlchemy's path too.)
    store = Store.open(sqlite_url)
    await store.migrate()
    bad = [("u", None, None, {}, "bad-k", NOW, NOW)]  # name is NOT NULL
    with pytest.raises(sa.exc.IntegrityError) as caught:
        async with store.begin() as conn:
            await EventInserter(store, conn.dialect).insert(conn, _rows("rb") + bad)
    assert caught.value.orig is not None
    assert not is_unavailable(caught.value)
    assert await _stored(store, "rb") == []
    # Alone, the failed transaction is rolled back, and the connection is free again.
    async with store.connect() as conn:
        inserter = EventInserter(store, conn.dialect)
        with pytest.raises(sa.exc.IntegrityError):
            await inserter.insert(conn, _rows("rb") + bad, alone=True)
        assert not conn.in_transaction()
        got, _ = await inserter.insert(conn, _rows("rb"), alone=True)
    assert len(got) == len(ATTRIBUTES)
    assert len(await _stored(store, "rb")) == len(ATTRIBUTES)
    await store.close()


@pytest.mark.mariadb
async def test_a_connection_lost_mid_insert_reads_as_unavailable(mariadb_url: str) -> None:
    store = Store.open(mariadb_url)
    await store.migrate()
    conn = await store.engine.connect()
    try:
        await conn.begin()
        own = (await conn.execute(sa.text("SELECT CONNECTION_ID()"))).scalar_one()
        async with store.connect() as other:
            await other.execute(sa.text("KILL :id"), {"id": own})
        with pytest.raises(sa.exc.DBAPIError) as caught:
            await EventInserter(store, conn.dialect).insert(conn, _rows("gone"))
        assert conn.invalidated
        await conn.close()
        assert caught.value.connection_invalidated
        assert is_unavailable(caught.value)
        assert await _stored(store, "gone") == []
    finally:
        await conn.close()
        await store.close()
