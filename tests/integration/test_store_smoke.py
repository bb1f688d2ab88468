from __future__ import annotations

import pytest
import sqlalchemy as sa

from segflowd import schema
from segflowd.store import Store

pytestmark = pytest.mark.anyio


async def test_fresh_store_is_at_current_schema_version(store: Store) -> None:
    assert await store.read_schema_version() == schema.SCHEMA_VERSION
    async with store.connect() as conn:
        count = (await conn.execute(sa.select(sa.func.count()).select_from(schema.users))).scalar()
    assert count == 0
