"""Durable cursors of ingest consumers: how far each has processed the store.

The in-memory hand-off from ingest (:class:`~segflowd.hooks.IngestSink`) is the fast
path only; a consumer records here the last event id and user ``updated_at`` it has
fully processed, and at start it catches up with everything committed after them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .schema import engine_cursors, events, segment_changes

__all__ = ["SAVE_INTERVAL", "Cursor", "load_cursor", "max_change_id", "max_event_id",
           "save_cursor"]

# Seconds a consumer's stored cursor may trail its work. Saving after every batch would
# be a write transaction per ingest flush per consumer; a cursor that trails only means
# more to catch up at start, and catching up is idempotent (segment evaluation is; a
# transactional message has a dedupe key).
SAVE_INTERVAL = 1.0


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Everything up to ``last_event_id`` and ``last_user_updated_at`` was processed."""

    last_event_id: int
    last_user_updated_at: dt.datetime | None


async def load_cursor(conn: AsyncConnection, name: str) -> Cursor | None:
    """The consumer's cursor, or None when it never ran against this store."""
    row = (await conn.execute(
        sa.select(engine_cursors.c.last_event_id, engine_cursors.c.last_user_updated_at)
        .where(engine_cursors.c.name == name))).first()
    if row is None:
        return None
    return Cursor(int(row[0]), row[1])


async def save_cursor(conn: AsyncConnection, name: str, cursor: Cursor,
                      now: dt.datetime) -> None:
    values = {"last_event_id": cursor.last_event_id,
              "last_user_updated_at": cursor.last_user_updated_at, "updated_at": now}
    done = await conn.execute(
        sa.update(engine_cursors).where(engine_cursors.c.name == name).values(**values))
    if done.rowcount == 0:
        await conn.execute(sa.insert(engine_cursors).values(name=name, **values))


async def max_change_id(conn: AsyncConnection) -> int:
    """The highest segment change id this connection sees (0 for none)."""
    found = (await conn.execute(sa.select(sa.func.max(segment_changes.c.id)))).scalar()
    return int(found or 0)


async def max_event_id(conn: AsyncConnection) -> int:
    """The highest event id committed so far (0 for none)."""
    found = (await conn.execute(sa.select(sa.func.max(events.c.id)))).scalar()
    return int(found or 0)
