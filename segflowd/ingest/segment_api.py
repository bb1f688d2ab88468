"""The Segment HTTP Tracking API: payloads into the committer's writes.

``identify`` merges ``traits`` into the user (a null trait removes it) and, given an
``anonymousId`` too, links it so the anonymous events become the user's. Traits are read
from ``context.traits`` too (RudderStack sends them only there); the top-level ``traits``
win on conflict. A ``createdAt`` (or ``created_at``) trait, ISO 8601 or Unix seconds,
sets the user's signup time (users.created_at). ``track`` stores ``event`` with
``properties``. ``page``, ``screen`` and ``group`` are stored as events named ``$page``,
``$screen`` and ``$group``. ``alias`` links ``previousId`` (an anonymous id) to
``userId``. A non-empty ``context`` is kept in the event's attributes as ``$context``;
in ``/v1/batch`` the batch-level context is merged under each item's. ``messageId``
dedupes per user (or anonymous id).

Event time is Segment's: with ``sentAt`` (the message's, else the batch's) beside
``timestamp``, the client's clock skew is corrected, ``received - (sentAt - timestamp)``,
and the client's own ``timestamp`` is kept in the event's attributes as ``$timestamp``;
without ``sentAt`` the event's time is ``timestamp``; without both, the time received.

analytics.js posts to one-letter routes (:data:`SHORT_ROUTES`); ``/v1/b`` and
``/v1/import`` take a batch like ``/v1/batch``.
"""

from __future__ import annotations

import datetime as dt
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
    signup_time,
    time_in_range,
)
from .writes import EventWrite, LinkWrite, UserWrite, Write

__all__ = ["BATCH_ROUTES", "SHORT_ROUTES", "TYPES", "items_of", "parse_batch",
           "parse_message"]

TYPES = ("identify", "track", "page", "screen", "group", "alias")
SHORT_ROUTES = {"i": "identify", "t": "track", "p": "page", "s": "screen", "g": "group",
                "a": "alias"}  # analytics.js: /v1/i is /v1/identify, ...
BATCH_ROUTES = ("batch", "b", "import")  # /v1/<route> taking {"batch": [...]}
CONTEXT_KEY = "$context"  # where an event keeps the Segment context it came with
TIMESTAMP_KEY = "$timestamp"  # where a skew-corrected event keeps the client's timestamp
BATCH_MAX_ITEMS = 2500  # Segment's own limit is 500 KB per batch; this bounds the count


def _event_time(msg: Mapping[str, object], field: str, received: dt.datetime | None,
                batch_sent: dt.datetime | None) -> tuple[dt.datetime | None, bool]:
    """The event's time, and whether it was corrected for the client's clock skew."""
    when = opt_time(msg.get("timestamp"), f"{field}.timestamp")
    sent = opt_time(msg.get("sentAt"), f"{field}.sentAt") or batch_sent
    if when is None or sent is None or received is None:
        return when, False
    try:
        corrected = received - (sent - when)
    except OverflowError:
        corrected = dt.datetime.min
    if not time_in_range(corrected):
        raise field_error(f"{field}.sentAt", "is too far from timestamp: the corrected time "
                          "is out of range")
    return corrected, True


def _identify_traits(msg: Mapping[str, object], field: str,
                     context: Mapping[str, object]) -> dict[str, object]:
    """``context.traits`` under the top-level ``traits``, which win on conflict."""
    traits = opt_object(msg.get("traits"), f"{field}.traits")
    inner = opt_object(context.get("traits"), f"{field}.context.traits")
    return {**inner, **traits} if inner else traits


def parse_message(msg: Mapping[str, object], kind: str, *, field: str, max_event: int | None,
                  batch_context: Mapping[str, object] | None = None,
                  received: dt.datetime | None = None,
                  batch_sent: dt.datetime | None = None) -> list[Write]:
    """One Segment message of type ``kind`` as writes; 400 naming ``field.x`` if invalid.

    ``received`` (the time the request came, naive UTC) enables the clock-skew
    correction; ``batch_sent`` is a batch's ``sentAt``, for items without their own.
    """
    check_size(msg, max_event, field)
    user_id = opt_id(msg.get("userId"), f"{field}.userId")
    anon = opt_id(msg.get("anonymousId"), f"{field}.anonymousId")
    when, corrected = _event_time(msg, field, received, batch_sent)
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
        if corrected:
            attributes = {**attributes, TIMESTAMP_KEY: msg.get("timestamp")}
        return EventWrite(name=name, attributes=attributes, created_at=when, user_id=user_id,
                          anonymous_id=anon, dedupe_key=key)

    if kind == "identify":
        traits = _identify_traits(msg, field, context)
        signup = signup_time(traits, f"{field}.traits")
        if user_id is None:
            return [event("$identify", traits)]  # traits of someone not yet known
        writes: list[Write] = [UserWrite(user_id, traits, created_at=signup)]
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


def parse_batch(body: Mapping[str, object], *, max_event: int | None,
                received: dt.datetime | None = None) -> list[Write]:
    """``/v1/batch``: ``{"batch": [...], "context"?, "sentAt"?}``; every item is checked
    first."""
    items = body.get("batch")
    if not isinstance(items, list):
        raise field_error("batch", "must be an array of messages")
    if len(items) > BATCH_MAX_ITEMS:
        raise field_error("batch", f"has {len(items)} messages; the limit is {BATCH_MAX_ITEMS}")
    context = opt_object(body.get("context"), "context")
    sent = opt_time(body.get("sentAt"), "sentAt")
    writes: list[Write] = []
    for i, raw in enumerate(items):
        item = require_object(raw, f"batch[{i}]")
        kind = item.get("type")
        if kind not in TYPES:
            raise field_error(f"batch[{i}].type", f"must be one of {', '.join(TYPES)}")
        assert isinstance(kind, str)
        writes += parse_message(item, kind, field=f"batch[{i}]", max_event=max_event,
                                batch_context=context, received=received, batch_sent=sent)
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
