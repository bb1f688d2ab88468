"""Which users exist, read so that a concurrent forget cannot slip between the read and
the writer's own rows.

A forget deletes the user's row first and everything of theirs after it, in one
transaction. A writer about to add a row that names a user (a flow instance, a
membership, a broadcast message, a subscription) reads the user's row with a shared lock
(``FOR SHARE``; MySQL): then either the forget has committed and the user is gone, or the
forget waits for the writer's commit and then rewrites or deletes what it wrote. On
MariaDB's READ COMMITTED a plain read would see the row of a user whose uncommitted forget
has already passed the writer's table. SQLite serialises writers; the lock clause is
ignored there.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .schema import users

__all__ = ["existing_users"]

IN_CHUNK = 500  # ids per IN (...) list


async def existing_users(conn: AsyncConnection, user_ids: Iterable[str], *,
                         lock: bool = True) -> set[str]:
    """Those of ``user_ids`` that exist; with ``lock``, their rows share-locked until the
    transaction ends (taken in id order, as the committer writes them: fewer deadlocks)."""
    ids = sorted(set(user_ids))
    found: set[str] = set()
    for i in range(0, len(ids), IN_CHUNK):
        query = sa.select(users.c.id).where(users.c.id.in_(ids[i:i + IN_CHUNK]))
        if lock:
            query = query.order_by(users.c.id).with_for_update(read=True)
        found.update(str(u) for u in (await conn.execute(query)).scalars())
    return found
