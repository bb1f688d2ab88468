"""What became of a sent message: ``message_events`` rows for reports.

A provider's webhook says a message was delivered, bounced or complained about; its
unsubscribe link says its reader unsubscribed. Each is kept once per message and kind
(the first time wins: a provider that retries a webhook changes nothing), with the time
the daemon learnt it. A webhook is matched to its message by the provider's id of it
(``messages.provider_message_id``: Postmark's ``MessageID``, SES's ``mail.messageId``);
one about a message the store does not hold (pruned, or sent by something else) is
ignored. Recording never fails the webhook or the unsubscribe that triggered it: a store
error is logged and the answer goes on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import sqlalchemy as sa
import structlog

from ..errors import SegflowError
from ..kernel import Kernel
from ..schema import message_events, messages

__all__ = ["EVENT_KINDS", "record_message_event", "record_postmark", "record_ses"]

log = structlog.get_logger("segflowd.msgevents")

EVENT_KINDS = ("delivered", "bounced", "complained", "unsubscribed")  # recorded here
# opened | clicked rows are copied from engagement by reports (segflowd.reports.catchup)
PROVIDER_ID_MAX = 255  # characters: messages.provider_message_id's length
# Postmark's RecordType and SES's notificationType / eventType -> our kind
POSTMARK_KINDS = {"Delivery": "delivered", "Bounce": "bounced", "SpamComplaint": "complained"}
SES_KINDS = {"Delivery": "delivered", "Bounce": "bounced", "Complaint": "complained"}


async def record_message_event(k: Kernel, message_id: object, kind: str, *,
                               provider_id: str | None = None) -> bool:
    """Record that message ``message_id`` (or the message the provider calls
    ``provider_id``) was ``kind``; True when the row is new. Never raises for a store
    error or an unknown message: it logs and returns False."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown message event kind {kind!r}")
    now: dt.datetime = k.clock.now()
    m = messages.c
    key = (m.id, m.campaign, m.step, m.template, m.variant, m.created_at)
    try:
        async with k.store.begin() as conn:
            if provider_id is not None:
                if not provider_id or len(provider_id) > PROVIDER_ID_MAX:
                    return False
                found = (await conn.execute(sa.select(*key).where(
                    m.provider_message_id == provider_id).order_by(m.id.desc()).limit(1))
                         ).first()
            else:
                mid = _int(message_id)
                found = None if mid is None else (await conn.execute(
                    sa.select(*key).where(m.id == mid))).first()
            if found is None:
                return False
            done = await conn.execute(k.store.insert_ignore(message_events).values(
                message_id=int(found.id), kind=kind, created_at=now, campaign=found.campaign,
                step=found.step, template=found.template, variant=found.variant,
                sent_on=found.created_at))
    except (SegflowError, sa.exc.SQLAlchemyError, OSError) as exc:
        log.warning("message_event.failed", kind=kind, error=f"{type(exc).__name__}: {exc}")
        return False
    new = bool(done.rowcount)
    if new:
        k.bus.publish(f"message.{kind}", message=int(found.id), campaign=found.campaign)
    return new


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


async def record_postmark(k: Kernel, body: Mapping[str, object]) -> bool:
    """Record a Postmark Delivery, Bounce or SpamComplaint webhook against its message."""
    kind = POSTMARK_KINDS.get(str(body.get("RecordType", "")))
    provider_id = body.get("MessageID")
    if kind is None or not isinstance(provider_id, str):
        return False
    return await record_message_event(k, None, kind, provider_id=provider_id)


async def record_ses(k: Kernel, note: object) -> bool:
    """Record an SES Delivery, Bounce or Complaint notification against its message."""
    if not isinstance(note, Mapping):
        return False
    kind = SES_KINDS.get(str(note.get("notificationType") or note.get("eventType") or ""))
    mail = note.get("mail")
    provider_id = mail.get("messageId") if isinstance(mail, Mapping) else None
    if kind is None or not isinstance(provider_id, str):
        return False
    return await record_message_event(k, None, kind, provider_id=provider_id)
