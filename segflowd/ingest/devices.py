"""Push device tokens: Customer.io's ``PUT/DELETE /api/v1/customers/{id}/devices``.

A device is a token (the APNs or FCM token the app registered) with its ``platform``
(``ios`` or ``android``), the client's ``last_used`` time and free ``attributes``. A
token belongs to one user: adding it to another moves it, as Customer.io does (the
phone changed hands, or another account logged in on it). Deleting a token deletes it
only from the user named; an unknown token is not an error (a client retrying a delete
whose reply it lost gets the same answer).

Writes take the user's row with a shared lock (:mod:`segflowd.userlocks`), so a
concurrent forget either ran first (the user is gone and nothing is written) or waits
and then deletes the device with the rest of the user.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import schema
from ..store import Store
from ..userlocks import existing_users
from .payloads import field_error, opt_object, opt_time

__all__ = [
    "PLATFORMS",
    "Device",
    "DeviceOp",
    "apply_device_ops",
    "devices_of",
    "move_devices",
    "parse_device",
    "parse_token",
]

PLATFORMS = frozenset({"ios", "android"})
TOKEN_MAX = 255  # characters: devices.token's width
_KNOWN = frozenset({"id", "token", "platform", "last_used", "attributes"})


@dataclasses.dataclass(frozen=True)
class Device:
    token: str
    platform: str
    last_used: dt.datetime | None
    attributes: Mapping[str, object]


@dataclasses.dataclass(frozen=True)
class DeviceOp:
    """Add (``device``) or delete (``token``) one device of ``user_id``."""

    user_id: str
    device: Device | None = None
    token: str | None = None


def parse_token(value: object, field: str) -> str:
    if value is None or value == "":
        raise field_error(field, "is required (the device token)")
    if not isinstance(value, str):
        raise field_error(field, "must be a string")
    if len(value) > TOKEN_MAX:
        raise field_error(field, f"is {len(value)} characters long; the limit is {TOKEN_MAX}")
    return value


def parse_device(value: object, field: str) -> Device:
    """A ``device`` object: ``id`` (v1) or ``token`` (v2), ``platform``, ``last_used``
    (Unix seconds), ``attributes``. Other keys (the Python client sends its keyword
    arguments at the top level) are kept in the attributes."""
    if not isinstance(value, dict):
        raise field_error(field, "must be a JSON object with the device's id and platform")
    key = "token" if "token" in value else "id"
    token = parse_token(value.get(key), f"{field}.{key}")
    platform = value.get("platform")
    if not isinstance(platform, str) or platform.lower() not in PLATFORMS:
        raise field_error(f"{field}.platform", 'must be "ios" or "android"')
    extra = {k: v for k, v in value.items() if k not in _KNOWN}
    attributes = {**extra, **opt_object(value.get("attributes"), f"{field}.attributes")}
    return Device(token=token, platform=platform.lower(),
                  last_used=opt_time(value.get("last_used"), f"{field}.last_used"),
                  attributes=attributes)


async def apply_device_ops(store: Store, ops: Sequence[DeviceOp], now: dt.datetime) -> set[str]:
    """Apply ``ops`` in one transaction; the users of ``ops`` that did not exist."""
    try:
        return await _apply_once(store, ops, now)
    except IntegrityError:  # another request added the same new token first: update it
        return await _apply_once(store, ops, now)


async def _apply_once(store: Store, ops: Sequence[DeviceOp], now: dt.datetime) -> set[str]:
    d = schema.devices
    async with store.begin() as conn:
        found = await existing_users(conn, {op.user_id for op in ops})
        for op in ops:
            if op.user_id not in found:
                continue
            if op.device is None:
                await conn.execute(sa.delete(d).where(d.c.token == op.token,
                                                      d.c.user_id == op.user_id))
                continue
            dev = op.device
            values = {"user_id": op.user_id, "platform": dev.platform,
                      "last_used": dev.last_used, "attributes": dict(dev.attributes),
                      "updated_at": now}
            done = await conn.execute(sa.update(d).where(d.c.token == dev.token).values(**values))
            if done.rowcount == 0:
                await conn.execute(sa.insert(d).values(token=dev.token, created_at=now, **values))
    return {op.user_id for op in ops} - found


async def devices_of(conn: AsyncConnection, user_id: str) -> list[dict[str, object]]:
    """The user's devices as ``GET /v1/users/{id}`` shows them, newest first."""
    d = schema.devices
    rows = await conn.execute(sa.select(d).where(d.c.user_id == user_id)
                              .order_by(d.c.updated_at.desc(), d.c.token))
    return [{"id": r.token, "platform": r.platform, "last_used": _iso(r.last_used),
             "attributes": dict(r.attributes or {}), "created_at": _iso(r.created_at),
             "updated_at": _iso(r.updated_at)} for r in rows]


async def move_devices(conn: AsyncConnection, source: str, target: str,
                       now: dt.datetime) -> int:
    """Give ``source``'s devices to ``target`` (a merge); how many moved."""
    d = schema.devices
    done = await conn.execute(sa.update(d).where(d.c.user_id == source)
                              .values(user_id=target, updated_at=now))
    return int(done.rowcount)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"
