"""The Segment HTTP Tracking API: payloads into the committer's writes.

``identify`` merges ``traits`` into the user (a null trait removes it) and, given an
``anonymousId`` too, links it so the anonymous events become the user's. ``track``
stores ``event`` with ``properties``. ``page``, ``screen`` and ``group`` are stored as
events named ``$page``, ``$screen`` and ``$group``. ``alias`` links ``previousId`` (an
anonymous id) to ``userId``. A non-empty ``context`` is kept in the event's attributes
as ``$context``; in ``/v1/batch`` the batch-level context is merged under each item's.
``messageId`` dedupes per user (or anonymous id).
"""

from __future__ import annotations

from collections.abc import Mapping

from .payloads import (
    check_size,
    dedupe_key,
    field_error,
    opt_id,
    opt_object,
    opt_time,
    require_id,
    require_name,
    require_object,
)
from .writes import EventWrite, LinkWrite, UserWrite, Write

__all__ = ["TYPES", "items_of", "parse_batch", "parse_message"]

TYPES = ("identify", "track", "page", "screen", "group", "alias")
CONTEXT_KEY = "$context"  # where an event keeps the Segment context it came with
BATCH_MAX_ITEMS = 2500  # Segment's own limit is 500 KB per batch; this bounds the count


def parse_message(msg: Mapping[str, object], kind: str, *, field: str, max_event: int | None,
                  batch_context: Mapping[str, object] | None = None) -> list[Write]:
    """One Segment message of type ``kind`` as writes; 400 naming ``field.x`` if invalid."""
    check_size(msg, max_event, field)
    user_id = opt_id(msg.get("userId"), f"{field}.userId")
    anon = opt_id(msg.get("anonymousId"), f"{field}.anonymousId")
    when = opt_time(msg.get("timestamp"), f"{field}.timestamp")
    context = opt_object(msg.get("context"), f"{field}.context")
    if batch_context:
        context = {**batch_context, **context}
    if kind == "alias":
        previous = require_id(msg.get("previousId"), f"{field}.previousId")
        uid = require_id(msg.get("userId"), f"{field}.userId")
        return [UserWrite(uid, {}), LinkWrite(previous, uid)]
    if user_id is None and anon is None:
        raise field_error(f"{field}.userId", "userId or anonymousId is required")
    owner = user_id or anon or ""
    key = dedupe_key("s", owner, msg.get("messageId"), f"{field}.messageId")

    def event(name: str, attributes: dict[str, object]) -> EventWrite:
        if context:
            attributes = {**attributes, CONTEXT_KEY: context}
        return EventWrite(name=name, attributes=attributes, created_at=when, user_id=user_id,
                          anonymous_id=anon, dedupe_key=key)

    if kind == "identify":
        traits = opt_object(msg.get("traits"), f"{field}.traits")
        if user_id is None:
            return [event("$identify", traits)]  # traits of someone not yet known
        writes: list[Write] = [UserWrite(user_id, traits)]
        if anon is not None:
            writes.append(LinkWrite(anon, user_id))
        return writes
    if kind == "track":
        name = require_name(msg.get("event"), f"{field}.event")
        return [event(name, opt_object(msg.get("properties"), f"{field}.properties"))]
    if kind in ("page", "screen"):
        props = opt_object(msg.get("properties"), f"{field}.properties")
        for k in ("name", "category"):
            v = msg.get(k)
            if v is not None:
                if not isinstance(v, str):
                    raise field_error(f"{field}.{k}", "must be a string")
                props = {k: v, **props}
        return [event(f"${kind}", props)]
    if kind == "group":
        group_id = require_id(msg.get("groupId"), f"{field}.groupId")
        traits = opt_object(msg.get("traits"), f"{field}.traits")
        return [event("$group", {"groupId": group_id, "traits": traits})]
    raise field_error(f"{field}.type", f"must be one of {', '.join(TYPES)}")


def parse_batch(body: Mapping[str, object], *, max_event: int | None) -> list[Write]:
    """``/v1/batch``: ``{"batch": [...], "context"?}``; every item is checked first."""
    items = body.get("batch")
    if not isinstance(items, list):
        raise field_error("batch", "must be an array of messages")
    if len(items) > BATCH_MAX_ITEMS:
        raise field_error("batch", f"has {len(items)} messages; the limit is {BATCH_MAX_ITEMS}")
    context = opt_object(body.get("context"), "context")
    writes: list[Write] = []
    for i, raw in enumerate(items):
        item = require_object(raw, f"batch[{i}]")
        kind = item.get("type")
        if kind not in TYPES:
            raise field_error(f"batch[{i}].type", f"must be one of {', '.join(TYPES)}")
        assert isinstance(kind, str)
        writes += parse_message(item, kind, field=f"batch[{i}]", max_event=max_event,
                                batch_context=context)
    return writes


def items_of(body: Mapping[str, object], user_ids: tuple[str, ...]) -> str:
    """``"batch[1], batch[4]: "``: the items of a parsed batch that write to ``user_ids``."""
    items = body.get("batch")
    wanted = set(user_ids)
    found = [f"batch[{i}]" for i, item in enumerate(items if isinstance(items, list) else [])
             if isinstance(item, dict) and opt_id(item.get("userId"), "") in wanted]
    if len(found) > 10:
        found = [*found[:10], "..."]
    return ", ".join(found) + ": " if found else ""
