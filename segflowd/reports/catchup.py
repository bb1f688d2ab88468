"""Copying a person's opens and clicks into ``message_events`` before a report counts them.

``engagement`` keeps one row per message, kind, URL and machine flag, inserted once (later
hits only update it) and in id order (one recorder per store writes them). So the rows
past a cursor (``engine_cursors`` row :data:`CURSOR`, ``last_event_id`` = the last
engagement id copied) are exactly the new ones: each report copies those that are a
person's (not ``machine``) open or click of a campaign message as an ``opened`` /
``clicked`` row, once per message, with the message's report key. A report's cost then
grows with the engagement since the last one, not with all of it. Copying is idempotent:
two reports at once insert the same rows once, and the cursor only moves forward; the
last :data:`OVERLAP` ids before it are copied again, for a row that committed late.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..schema import engagement, engine_cursors, message_events, messages
from ..store import Store

__all__ = ["BATCH", "CURSOR", "catch_up"]

CURSOR = "reports.engagement"
BATCH = 50_000  # engagement ids per copying transaction
# Engagement ids below the cursor copied again each time: a row written by another path
# (the push events route) may commit after a higher id did; copying twice is harmless.
OVERLAP = 10_000


async def _cursor(conn: AsyncConnection) -> int:
    found = (await conn.execute(sa.select(engine_cursors.c.last_event_id).where(
        engine_cursors.c.name == CURSOR))).scalar()
    return int(found or 0)


async def catch_up(store: Store, now: dt.datetime) -> int:
    """Copy the engagement rows stored since the last call; how many ids it went past."""
    e, m, ec = engagement.c, messages.c, engine_cursors.c
    async with store.connect() as conn:
        after = max(0, await _cursor(conn) - OVERLAP)
        top = int((await conn.execute(sa.select(sa.func.max(e.id)))).scalar() or 0)
    start = after
    while after < top:
        upto = min(after + BATCH, top)
        kind = sa.case((e.kind == "open", "opened"), else_="clicked")
        rows = (sa.select(e.message_id, kind, sa.func.min(e.created_at), m.campaign, m.step,
                          m.template, m.variant, m.created_at)
                .select_from(engagement.join(messages, m.id == e.message_id))
                .where(e.id > after, e.id <= upto, e.machine.is_(False),
                       e.kind.in_(("open", "click")), m.campaign.is_not(None))
                .group_by(e.message_id, kind, m.campaign, m.step, m.template, m.variant,
                          m.created_at))
        async with store.begin() as conn:
            await conn.execute(store.insert_ignore(message_events).from_select(
                ["message_id", "kind", "created_at", "campaign", "step", "template", "variant",
                 "sent_on"], rows))
            await conn.execute(store.insert_ignore(engine_cursors).values(
                name=CURSOR, last_event_id=0, updated_at=now))
            await conn.execute(sa.update(engine_cursors).where(
                ec.name == CURSOR, ec.last_event_id < upto).values(
                last_event_id=upto, updated_at=now))
        after = upto
    return after - start
