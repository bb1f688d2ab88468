"""Customer.io Track API v2: ``POST /api/v2/entity`` and ``POST /api/v2/batch``.

An entity is ``{"type": "person", "action": ..., "identifiers": {"id" | "email"}, ...}``;
a batch is ``{"batch": [entity, ...]}``, validated whole before anything is written.
The ``person`` actions:

* ``identify``: ``attributes`` merged into the user's (a null removes one);
* ``event``, ``page``, ``screen``: ``name``, ``attributes`` (the event's data),
  ``timestamp`` (Unix seconds) and ``id`` (dedupes per user, with the v1 API's ids). A
  page is stored as ``$page`` with the name in ``url``, a screen as ``$screen`` with it
  in ``name``;
* ``delete``: forget the user, as ``DELETE /v1/users/{id}`` does;
* ``add_device``, ``delete_device``: ``device`` ``{token, platform, last_used,
  attributes}`` (see :mod:`segflowd.ingest.devices`).

Other types (``object``, ``delivery``) and actions are a 400 naming the field; so is a
``cio_id`` identifier, which only Customer.io assigns. This module parses; resolving an
email identifier to a user needs the store and is done by :mod:`segflowd.ingest.cio_track`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping

from .devices import Device, parse_device, parse_token
from .payloads import (
    check_size,
    field_error,
    opt_id,
    opt_object,
    opt_time,
    require_name,
    require_object,
)
from .users import check_email

__all__ = ["ACTIONS", "Entity", "parse_batch", "parse_entity"]

ACTIONS = ("identify", "event", "page", "screen", "delete", "add_device", "delete_device")
BATCH_MAX = 1000  # entities per batch


@dataclasses.dataclass(frozen=True)
class Entity:
    """One validated ``person`` operation; ``field`` is where it was (for errors)."""

    field: str
    action: str
    user_id: str | None  # identifiers.id
    email: str | None  # identifiers.email (normalised), when no id was given
    attributes: Mapping[str, object] = dataclasses.field(default_factory=dict)
    name: str | None = None
    timestamp: dt.datetime | None = None
    event_id: object = None
    device: Device | None = None
    token: str | None = None


def parse_batch(body: Mapping[str, object], *, max_event: int | None) -> list[Entity]:
    items = body.get("batch")
    if not isinstance(items, list):
        raise field_error("batch", "is required: a JSON array of entities")
    if not items:
        raise field_error("batch", "is empty")
    if len(items) > BATCH_MAX:
        raise field_error("batch", f"holds {len(items)} entities; the limit is {BATCH_MAX}")
    return [parse_entity(item, f"batch[{i}]", max_event=max_event)
            for i, item in enumerate(items)]


def parse_entity(value: object, field: str, *, max_event: int | None) -> Entity:
    body = require_object(value, field)
    check_size(body, max_event, field)
    kind = body.get("type")
    if kind != "person":
        raise field_error(f"{field}.type", f"{_shown(kind)} is not supported here: only "
                          '"person" (objects and deliveries are not kept by Segflow)')
    action = body.get("action")
    if action not in ACTIONS:
        names = ", ".join(ACTIONS)
        raise field_error(f"{field}.action", f"{_shown(action)} is not one of {names}")
    user_id, email = _identifiers(body.get("identifiers"), f"{field}.identifiers")
    base = Entity(field=field, action=str(action), user_id=user_id, email=email)
    if action == "identify":
        return dataclasses.replace(base, attributes=opt_object(body.get("attributes"),
                                                               f"{field}.attributes"))
    if action in ("event", "page", "screen"):
        name = require_name(body.get("name"), f"{field}.name")
        data = opt_object(body.get("attributes"), f"{field}.attributes")
        if action == "page":
            data, name = {**data, "url": name}, "$page"
        elif action == "screen":
            data, name = {**data, "name": name}, "$screen"
        return dataclasses.replace(base, name=name, attributes=data,
                      timestamp=opt_time(body.get("timestamp"), f"{field}.timestamp"),
                      event_id=body.get("id"))
    if action == "add_device":
        return dataclasses.replace(base, device=parse_device(body.get("device"),
                                                             f"{field}.device"))
    if action == "delete_device":
        device = body.get("device")
        if not isinstance(device, dict):
            raise field_error(f"{field}.device", "must be a JSON object with the token")
        key = "token" if "token" in device else "id"
        token = parse_token(device.get(key), f"{field}.device.{key}")
        return dataclasses.replace(base, token=token)
    return base  # delete


def _identifiers(value: object, field: str) -> tuple[str | None, str | None]:
    ids = require_object(value, field)
    if "cio_id" in ids and "id" not in ids and "email" not in ids:
        raise field_error(f"{field}.cio_id", "is not supported: Segflow knows users by "
                          '"id" or "email"')
    user_id = opt_id(ids.get("id"), f"{field}.id")
    if user_id is not None:
        return user_id, None
    raw = ids.get("email")
    if raw is None or raw == "":
        raise field_error(field, 'must hold "id" or "email"')
    if not isinstance(raw, str):
        raise field_error(f"{field}.email", "must be a string")
    address, problem = check_email(raw.strip())
    if problem is not None:
        raise field_error(f"{field}.email", problem)
    return None, address


def _shown(value: object) -> str:
    if value is None:
        return "a missing value"
    return repr(value)[:60] if isinstance(value, str) else "a value that is not a string"
