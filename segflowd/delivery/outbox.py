"""Putting a message in the outbox: a ``messages`` row, written in the caller's transaction.

Flows call :func:`enqueue` in the same transaction as the journal row of their
``send_email`` step, transactions in the transaction that records the match, so a send
is committed together with the step that decided it and exists exactly once (the
``dedupe_key`` is unique). Delivery (:mod:`segflowd.delivery.service`) takes it from there.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..schema import messages

__all__ = ["Channel", "MessageKind", "Queued", "enqueue", "enqueue_many"]

MessageKind = Literal["campaign", "transaction", "test", "broadcast"]
Channel = Literal["email", "sms", "webhook"]
DEDUPE_CHUNK = 500  # dedupe keys looked up per query in enqueue_many
# The dedupe key of a message queued by the send routes (segflowd.ingest.sendapi): only such
# a row's data may carry its own subject and body (templates.OVERRIDES).
SEND_KEY_PREFIX = "send:"


@dataclasses.dataclass(frozen=True)
class Queued:
    """One message for :func:`enqueue_many` (the keywords of :func:`enqueue`)."""

    kind: MessageKind
    template: str
    user_id: str | None
    dedupe_key: str
    data: Mapping[str, object] = dataclasses.field(default_factory=dict)
    campaign: str | None = None
    instance_id: int | None = None
    to_address: str | None = None
    channel: Channel = "email"
    step: int | None = None  # a campaign message's seq in its instance
    variant: str | None = None  # the instance's latest rt.split() variant
    topic: str | None = None  # its campaign's or broadcast's topic


def _queued_row(now: dt.datetime, *, kind: MessageKind, template: str, user_id: str | None,
                dedupe_key: str | None, to_address: str | None,
                data: Mapping[str, object] | None, campaign: str | None,
                transaction: str | None, instance_id: int | None,
                channel: Channel, step: int | None = None, variant: str | None = None,
                topic: str | None = None) -> dict[str, object]:
    """The ``messages`` row of a message queued at ``now`` (one shape for both paths)."""
    return {"user_id": user_id, "kind": kind, "channel": channel, "campaign": campaign,
            "transaction": transaction,
            "instance_id": instance_id, "template": template, "to_address": to_address,
            "data": dict(data or {}), "status": "queued", "attempts": 0,
            "next_attempt_at": now, "dedupe_key": dedupe_key, "created_at": now,
            "updated_at": now, "step": step, "variant": variant, "topic": topic}


async def enqueue(
    conn: AsyncConnection, *, kind: MessageKind, template: str, now: dt.datetime,
    user_id: str | None, dedupe_key: str | None, to_address: str | None = None,
    data: Mapping[str, object] | None = None, campaign: str | None = None,
    transaction: str | None = None, instance_id: int | None = None, channel: Channel = "email",
    step: int | None = None, variant: str | None = None, topic: str | None = None,
) -> int | None:
    """Queue one message; return its row id, or None when ``dedupe_key`` was queued before.

    ``to_address`` None means "the user's email (``channel="sms"``: phone) at send time".
    ``data`` is the template context beyond ``user`` (JSON-able). Nothing is sent here.
    """
    if dedupe_key is not None:
        found = (await conn.execute(
            sa.select(messages.c.id).where(messages.c.dedupe_key == dedupe_key))).first()
        if found is not None:
            return None
    result = await conn.execute(sa.insert(messages).values(_queued_row(
        now, kind=kind, template=template, user_id=user_id, dedupe_key=dedupe_key,
        to_address=to_address, data=data, campaign=campaign, transaction=transaction,
        instance_id=instance_id, channel=channel, step=step, variant=variant, topic=topic)))
    pk = result.inserted_primary_key
    return int(pk[0]) if pk is not None else None


async def enqueue_many(conn: AsyncConnection, items: Sequence[Queued], *,
                       now: dt.datetime, look_up: bool = True) -> int:
    """Queue many messages in two statements per chunk (a round of flow steps, a batch of
    a broadcast); those whose ``dedupe_key`` was queued before are skipped. Returns how
    many were queued. Same guarantees as :func:`enqueue`, without its round trips.

    With ``look_up=False`` (the caller knows its keys are new) the look-up is left out:
    a key queued before is then refused by the store (IntegrityError), never sent twice.
    """
    queued = 0
    for lo in range(0, len(items), DEDUPE_CHUNK):
        chunk = items[lo:lo + DEDUPE_CHUNK]
        keys = [q.dedupe_key for q in chunk]
        seen = {r[0] for r in await conn.execute(
            sa.select(messages.c.dedupe_key).where(messages.c.dedupe_key.in_(keys)))
        } if look_up else set()
        rows = []
        for q in chunk:
            if q.dedupe_key in seen:
                continue
            seen.add(q.dedupe_key)  # a key twice in one call is queued once
            rows.append(_queued_row(
                now, kind=q.kind, template=q.template, user_id=q.user_id,
                dedupe_key=q.dedupe_key, to_address=q.to_address, data=q.data,
                campaign=q.campaign, transaction=None, instance_id=q.instance_id,
                channel=q.channel, step=q.step, variant=q.variant, topic=q.topic))
        if rows:
            await conn.execute(sa.insert(messages), rows)
            queued += len(rows)
    return queued
