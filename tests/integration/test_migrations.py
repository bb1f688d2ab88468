"""Numbered migration steps on real SQLite and MariaDB: an older store is brought up to date."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from segflowd import schema
from segflowd.store import Store

pytestmark = pytest.mark.anyio

INDEX = "ix_flow_instances_live_version"


def _indexes(conn: Connection) -> set[str]:
    return {str(i["name"]) for i in sa.inspect(conn).get_indexes("flow_instances")}


async def test_a_version_1_store_gains_the_live_version_index(store: Store) -> None:
    """m0002: the index a start uses to find instances on older versions."""
    async with store.begin() as conn:  # make the store what version 1 created
        await conn.execute(sa.text(
            "DROP INDEX ix_flow_instances_live_version" if store.dialect == "sqlite"
            else "DROP INDEX ix_flow_instances_live_version ON flow_instances"))
        await conn.execute(sa.update(schema.schema_version).values(version=1))
        assert INDEX not in await conn.run_sync(_indexes)
    assert await store.migrate() == 1
    assert await store.read_schema_version() == schema.SCHEMA_VERSION >= 2
    async with store.connect() as conn:
        assert INDEX in await conn.run_sync(_indexes)
