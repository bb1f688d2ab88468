"""Push metrics and the suppression list, as the Customer.io Track API changes them.

``POST /api/v1/push/events`` reports what a device did with a message:
``{delivery_id, event: opened | converted | delivered, device_id?, timestamp?}``. The
``delivery_id`` is a message id of ours (as the App API answers it, or the number
itself); the report is counted on the message's ``engagement`` row of kind ``open``
(which ``rt.opened()`` counts, as an open by a person), ``converted`` or ``delivered``,
like the tracking pixel's opens (:mod:`segflowd.delivery.tracking`). A report on an id
that is not one of ours is answered 200 and only counted
(``segflow_ingest_push_unknown_total``): a client cannot tell, and must not retry it.

``suppress`` / ``unsuppress`` put the user's current address on the suppression list
(reason ``manual``, source ``customerio``) and take it off again; an entry with another
reason (a bounce, a complaint) is left alone.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from .. import schema
from ..delivery.prepare import bare_address
from ..store import Store

__all__ = ["PUSH_KINDS", "SUPPRESS_REASON", "SUPPRESS_SOURCE", "bare_address",
           "message_id_of", "record_push", "suppress", "unsuppress"]

PUSH_KINDS = {"opened": "open", "converted": "converted", "delivered": "delivered"}
SUPPRESS_REASON = "manual"
SUPPRESS_SOURCE = "customerio"
_ID_MAX = 2**63 - 1


def message_id_of(delivery_id: object) -> int | None:
    """The message id a ``delivery_id`` names (a number, or its decimal string)."""
    if isinstance(delivery_id, int) and not isinstance(delivery_id, bool):
        value = delivery_id
    elif isinstance(delivery_id, str) and delivery_id.isascii() and delivery_id.isdigit():
        value = int(delivery_id)
    else:
        return None
    return value if 0 < value <= _ID_MAX else None


async def record_push(store: Store, message_id: int, kind: str, at: dt.datetime
                      ) -> dict[str, object] | None:
    """Count one ``kind`` hit on the message; its row (id, user, template, campaign), or
    None when there is no such message."""
    m, e = schema.messages.c, schema.engagement.c
    async with store.begin() as conn:
        # Locked (MariaDB) as the tracking recorder locks it: hits on one message are
        # counted one writer at a time, and a forget of its user waits for this one.
        row = (await conn.execute(sa.select(m.id, m.user_id, m.template, m.campaign)
                                  .where(m.id == message_id).with_for_update())).first()
        if row is None:
            return None
        same = (e.message_id == message_id, e.kind == kind, e.url.is_(None),
                e.machine == sa.false())
        found = (await conn.execute(sa.select(e.id).where(*same).order_by(e.id).limit(1))
                 ).first()
        if found is None:
            await conn.execute(sa.insert(schema.engagement).values(
                message_id=message_id, user_id=row.user_id, kind=kind, url=None,
                machine=False, hits=1, created_at=at, last_at=at))
        else:
            await conn.execute(sa.update(schema.engagement).where(e.id == found.id)
                               .values(hits=e.hits + 1, last_at=at))
    return {"message": int(row.id), "user_id": row.user_id, "template": row.template,
            "campaign": row.campaign}


async def suppress(store: Store, address: str, detail: str, now: dt.datetime) -> bool:
    """Put ``address`` on the list (once); True if it was not on it."""
    async with store.begin() as conn:
        done = await conn.execute(store.insert_ignore(schema.suppressions).values(
            address=bare_address(address), reason=SUPPRESS_REASON, source=SUPPRESS_SOURCE,
            detail=detail, created_at=now))
    return bool(done.rowcount)


async def unsuppress(store: Store, address: str) -> str | None:
    """Take ``address`` off the list if ``suppress`` put it there; the reason of an entry
    left in place (a bounce, a complaint), else None."""
    sp = schema.suppressions
    addr = bare_address(address)
    async with store.begin() as conn:
        row = (await conn.execute(sa.select(sp.c.reason, sp.c.source)
                                  .where(sp.c.address == addr))).first()
        if row is None:
            return None
        if row.reason != SUPPRESS_REASON:
            return str(row.reason)
        await conn.execute(sa.delete(sp).where(sp.c.address == addr))
    return None
