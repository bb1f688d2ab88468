"""The Customer.io Track API v1: payloads into the committer's writes.

``PUT /api/v1/customers/{id}`` merges the body's top-level keys into the user's
attributes (a null removes one). Events are ``{name, data?, timestamp?, id?}``; a
``type: "page"`` event (the client's ``pageview``) is stored as ``$page`` with the page
in ``url``. Timestamps are Unix seconds; ``id`` dedupes per customer.
"""

from __future__ import annotations

from collections.abc import Mapping

from .payloads import check_size, dedupe_key, opt_id, opt_object, opt_time, require_name
from .writes import EventWrite, UserWrite, Write

__all__ = ["parse_customer", "parse_event"]


def parse_customer(user_id: str, body: Mapping[str, object], *,
                   max_event: int | None) -> list[Write]:
    check_size(body, max_event, "body")
    return [UserWrite(user_id, dict(body))]


def parse_event(body: Mapping[str, object], *, user_id: str | None,
                max_event: int | None) -> list[Write]:
    """An event for ``user_id``, or an anonymous one (``anonymous_id`` in the body)."""
    check_size(body, max_event, "body")
    anon = None if user_id is not None else opt_id(body.get("anonymous_id"), "anonymous_id")
    name = require_name(body.get("name"), "name")
    data = opt_object(body.get("data"), "data")
    when = opt_time(body.get("timestamp"), "timestamp")
    if body.get("type") == "page":
        data = {**data, "url": name}
        name = "$page"
    owner = user_id or anon or ""
    key = dedupe_key("c", owner, body.get("id"), "id") if owner else None
    return [EventWrite(name=name, attributes=data, created_at=when, user_id=user_id,
                       anonymous_id=anon, dedupe_key=key)]
