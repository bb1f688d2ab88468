"""Putting a message in the outbox: a ``messages`` row, written in the caller's transaction.

Flows call :func:`enqueue` in the same transaction as the journal row of their
``send_email`` step, transactions in the transaction that records the match, so a send
is committed together with the step that decided it and exists exactly once (the
``dedupe_key`` is unique). Delivery (:mod:`segflowd.delivery`) takes it from there.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .schema import messages

__all__ = ["MessageKind", "enqueue"]

MessageKind = Literal["campaign", "transaction", "test", "broadcast"]


async def enqueue(
    conn: AsyncConnection, *, kind: MessageKind, template: str, now: dt.datetime,
    user_id: str | None, dedupe_key: str | None, to_address: str | None = None,
    data: Mapping[str, object] | None = None, campaign: str | None = None,
    transaction: str | None = None, instance_id: int | None = None,
) -> int | None:
    """Queue one message; return its row id, or None when ``dedupe_key`` was queued before.

    ``to_address`` None means "the user's email at send time". ``data`` is the template
    context beyond ``user`` (JSON-able). Nothing is sent here.
    """
    if dedupe_key is not None:
        found = (await conn.execute(
            sa.select(messages.c.id).where(messages.c.dedupe_key == dedupe_key))).first()
        if found is not None:
            return None
    result = await conn.execute(sa.insert(messages).values(
        user_id=user_id, kind=kind, campaign=campaign, transaction=transaction,
        instance_id=instance_id, template=template, to_address=to_address,
        data=dict(data or {}), status="queued", attempts=0, next_attempt_at=now,
        dedupe_key=dedupe_key, created_at=now, updated_at=now,
    ))
    pk = result.inserted_primary_key
    return int(pk[0]) if pk is not None else None
