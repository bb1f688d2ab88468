"""The store's read bound cuts a request's wait, never background work's.

``[store] timeout`` bounds each read of a MySQL/MariaDB connection made while serving an
HTTP request (``REQUEST_BOUND``, set in the daemon's HTTP context): a frozen server gets
a 503, not a hang. A segment refresh or a prune whose query computes for longer than the
bound before its first row is not a frozen server: outside a request it is not cut.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from segflowd.errors import StoreUnavailable
from segflowd.store import Store
from segflowd.storebounds import REQUEST_BOUND

pytestmark = pytest.mark.anyio

QUERY = sa.text("SELECT SLEEP(1.5)")  # 1.5 s before the first byte of the answer


async def test_a_long_query_outside_a_request_is_not_cut(mariadb_url: str) -> None:
    store = Store.open(mariadb_url, timeout=0.5)
    try:
        async with store.connect() as conn:
            assert (await conn.execute(QUERY)).scalar() == 0
    finally:
        await store.close()


async def test_the_same_query_in_a_request_is_cut_at_the_bound(mariadb_url: str) -> None:
    store = Store.open(mariadb_url, timeout=0.5)
    try:
        token = REQUEST_BOUND.set(store.timeout)  # as the daemon's HTTP context has it
        try:
            with pytest.raises(StoreUnavailable, match=r"no answer within 0\.5 s"):
                async with store.connect() as conn:
                    await conn.execute(QUERY)
        finally:
            REQUEST_BOUND.reset(token)
        async with store.connect() as conn:  # the pool hands out a working connection
            assert (await conn.execute(sa.text("SELECT 1"))).scalar() == 1
    finally:
        await store.close()
