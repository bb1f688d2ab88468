"""Event and segment-change ids only grow: an id deleted from the top is never issued again.

Wait marks (``flow_instances.wait_after``), consumer cursors (``engine_cursors``) and
change marks all take "a higher id" to mean "stored later"; a reused id would be passed
over. SQLite's INTEGER PRIMARY KEY reuses max+1 unless the table is AUTOINCREMENT.
"""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from segflowd import schema
from segflowd.ingest.users import forget_user
from segflowd.store import Store

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 1, 1)
TABLES = ("events", "segment_changes")  # the tables whose ids marks compare


async def _add_event(conn: AsyncConnection, user: str) -> int:
    done = await conn.execute(sa.insert(schema.events).values(
        user_id=user, name="paid", attributes={}, created_at=NOW, received_at=NOW))
    return int(done.inserted_primary_key[0])


async def _add_change(conn: AsyncConnection, user: str) -> int:
    done = await conn.execute(sa.insert(schema.segment_changes).values(
        segment="s", user_id=user, entered=True, at=NOW))
    return int(done.inserted_primary_key[0])


async def test_forgetting_the_newest_user_does_not_make_their_ids_reusable(
        store: Store) -> None:
    """The new event and change get ids above every id ever issued, not max+1 again."""
    async with store.begin() as conn:
        await conn.execute(sa.insert(schema.users), [
            {"id": u, "attributes": {}, "created_at": NOW, "updated_at": NOW}
            for u in ("old", "gone")])
        kept = [await _add_event(conn, "old"), await _add_change(conn, "old")]
        issued = [0, 0]
        for _n in range(3):
            issued = [await _add_event(conn, "gone"), await _add_change(conn, "gone")]
    async with store.begin() as conn:
        assert await forget_user(conn, "gone", NOW)
    async with store.begin() as conn:
        top = [int((await conn.execute(sa.select(sa.func.max(schema.metadata.tables[t].c.id))))
                   .scalar_one()) for t in TABLES]
        assert top == kept  # the forgotten user's rows, the newest, are gone
        fresh = [await _add_event(conn, "old"), await _add_change(conn, "old")]
    assert [f > i for f, i in zip(fresh, issued, strict=True)] == [True, True], (fresh, issued)


def _v3_metadata() -> sa.MetaData:
    """events and segment_changes as version 3 made them: no AUTOINCREMENT on SQLite."""
    md = sa.MetaData()
    for name in TABLES:
        table = schema.metadata.tables[name].to_metadata(md)
        table.dialect_options["sqlite"]["autoincrement"] = False
    return md


def _shape(conn: Connection, table: str) -> dict[str, object]:
    """What a migrated table must share with a fresh one: columns, keys, indexes, DDL."""
    insp = sa.inspect(conn)
    ddl = conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE name = :t"),
                       {"t": table}).scalar_one() if conn.dialect.name == "sqlite" else ""
    return {
        "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)],
        "pk": insp.get_pk_constraint(table)["constrained_columns"],
        "unique": sorted((u["name"], tuple(u["column_names"]))
                         for u in insp.get_unique_constraints(table)),
        "indexes": sorted((str(i["name"]), tuple(i["column_names"]))
                          for i in insp.get_indexes(table)),
        "autoincrement": "AUTOINCREMENT" in str(ddl).upper(),
        "ddl": " ".join(str(ddl).split()),
    }


async def _rows(conn: AsyncConnection) -> dict[str, list[sa.Row[object]]]:
    out: dict[str, list[sa.Row[object]]] = {}
    for name in TABLES:
        t = schema.metadata.tables[name]
        out[name] = list(await conn.execute(sa.select(t).order_by(t.c.id)))
    return out


async def test_a_version_3_store_is_rebuilt_so_ids_only_grow(store: Store) -> None:
    """m0004: on SQLite, events and segment_changes become AUTOINCREMENT tables with their
    rows, indexes and constraints, and the next id is above every id the store still
    names (cursors, wait marks, transactional dedupe keys); on MariaDB nothing changes."""
    async with store.connect() as conn:
        fresh = {t: await conn.run_sync(_shape, t) for t in TABLES}
    async with store.begin() as conn:  # make the store what version 3 created
        if store.dialect == "sqlite":
            for name in TABLES:
                await conn.run_sync(schema.metadata.tables[name].drop)
            await conn.run_sync(_v3_metadata().create_all)
        await conn.execute(sa.update(schema.schema_version).values(version=3))
        for u in ("a", "b"):
            await _add_event(conn, u)
            await _add_change(conn, u)
        rows = await _rows(conn)
        top = max(r.id for r in rows["events"])
        # Ids above the stored rows that the store still names: rows deleted after the
        # consumers, a wait and a transactional message saw them.
        top_change = max(r.id for r in rows["segment_changes"])
        await conn.execute(sa.insert(schema.engine_cursors), [
            {"name": "segments", "last_event_id": top + 2, "updated_at": NOW},
            {"name": "flows.changes", "last_event_id": top_change + 5, "updated_at": NOW}])
        await conn.execute(sa.insert(schema.flow_instances).values(
            campaign="c", user_id="a", version="v", status="waiting", live=1,
            wait_event="paid", wait_after=top + 3, created_at=NOW, updated_at=NOW))
        await conn.execute(sa.insert(schema.messages).values(
            kind="transaction", template="t", status="sent", dedupe_key=f"tx:{top + 4}:t",
            created_at=NOW, updated_at=NOW))
    # MariaDB never handed out ids below its counter, so only SQLite has a floor to keep.
    floor = (top + 4, top_change + 5) if store.dialect == "sqlite" else (top, top_change)
    assert await store.migrate() == 3
    assert await store.read_schema_version() == schema.SCHEMA_VERSION >= 4
    async with store.begin() as conn:
        assert {t: await conn.run_sync(_shape, t) for t in TABLES} == fresh
        assert await _rows(conn) == rows
        assert await _add_event(conn, "a") > floor[0]
        assert await _add_change(conn, "a") > floor[1]
    if store.dialect == "sqlite":
        assert fresh["events"]["autoincrement"] is True


async def test_a_version_3_sqlite_store_whose_events_were_all_deleted_keeps_above_its_cursor(
        sqlite_url: str) -> None:
    """m0004 with no event left: the first new id is above the consumers' cursor."""
    store = Store.open(sqlite_url)
    try:
        await store.migrate()
        async with store.begin() as conn:
            for name in TABLES:
                await conn.run_sync(schema.metadata.tables[name].drop)
            await conn.run_sync(_v3_metadata().create_all)
            await conn.execute(sa.update(schema.schema_version).values(version=3))
            await conn.execute(sa.insert(schema.engine_cursors).values(
                name="transactions", last_event_id=41, updated_at=NOW))
        assert await store.migrate() == 3
        async with store.begin() as conn:
            assert await _add_event(conn, "a") == 42
            assert await _add_change(conn, "a") == 1
    finally:
        await store.close()
