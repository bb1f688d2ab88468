"""Store operations on users: merge attributes, link anonymous ids, read, forget.

Every function takes an open connection inside the caller's transaction, so the group
committer can run many of them in one commit and nothing is half-written on failure.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import schema
from ..store import Store

__all__ = [
    "UserView",
    "forget_user",
    "link_anonymous",
    "merge_attributes",
    "read_user",
    "resolve_anonymous",
    "upsert_users",
]

_IN_CHUNK = 500  # ids per IN (...) list: well under every driver's parameter limit
EMAIL_MAX = 320  # characters: users.email's width


@dataclasses.dataclass(frozen=True)
class UserView:
    """A user as ``GET /v1/users/{id}`` shows them."""

    id: str
    email: str | None
    attributes: Mapping[str, object]
    created_at: dt.datetime
    updated_at: dt.datetime
    segments: tuple[Mapping[str, object], ...]
    campaigns: tuple[Mapping[str, object], ...]

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id, "email": self.email, "attributes": dict(self.attributes),
            "created_at": _iso(self.created_at), "updated_at": _iso(self.updated_at),
            "segments": [dict(s) for s in self.segments],
            "campaigns": [dict(c) for c in self.campaigns],
        }


def merge_attributes(current: Mapping[str, object],
                     changes: Mapping[str, object]) -> dict[str, object]:
    """``current`` updated by ``changes``; a ``None`` value removes the key."""
    out = dict(current)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def email_of(attributes: Mapping[str, object]) -> str | None:
    """The value kept in ``users.email``: ``attributes["email"]`` when it is a string."""
    value = attributes.get("email")
    if isinstance(value, str) and value.strip():
        return value.strip()[:EMAIL_MAX]
    return None


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i:i + _IN_CHUNK]


async def upsert_users(store: Store, conn: AsyncConnection,
                       changes: Mapping[str, list[Mapping[str, object]]],
                       now: dt.datetime) -> None:
    """Create or update each user in ``changes`` (user id → attribute changes, in order).

    An empty list of changes only makes sure the user exists (one INSERT IGNORE, no
    read). Changed users are read and written back in this transaction; the caller (the
    one group committer per process) is the only writer of user attributes, so no update
    is lost between the read and the write.
    """
    if not changes:
        return
    u = schema.users
    ensure = [uid for uid, c in changes.items() if not c]
    if ensure:
        await conn.execute(store.insert_ignore(u), [
            {"id": uid, "email": None, "attributes": {}, "created_at": now, "updated_at": now}
            for uid in ensure])
    ids = [uid for uid, c in changes.items() if c]
    existing: dict[str, dict[str, object]] = {}
    for chunk in _chunks(ids):
        rows = await conn.execute(sa.select(u.c.id, u.c.attributes).where(u.c.id.in_(chunk)))
        for uid, attrs in rows:
            existing[uid] = dict(attrs or {})
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for uid in ids:
        attrs = existing.get(uid, {})
        for change in changes[uid]:
            attrs = merge_attributes(attrs, change)
        row = {"attributes": attrs, "email": email_of(attrs), "updated_at": now}
        if uid in existing:
            updates.append({"b_id": uid, **row})
        else:
            inserts.append({"id": uid, "created_at": now, **row})
    if inserts:
        await conn.execute(sa.insert(u), inserts)
    if updates:
        await conn.execute(
            sa.update(u).where(u.c.id == sa.bindparam("b_id"))
            .values(attributes=sa.bindparam("attributes"), email=sa.bindparam("email"),
                    updated_at=sa.bindparam("updated_at")),
            updates,
        )


async def link_anonymous(conn: AsyncConnection, links: Mapping[str, str],
                         now: dt.datetime) -> set[str]:
    """Record anonymous id → user id and give the anonymous events to the user.

    Returns the users that received events.
    """
    al, ev = schema.anonymous_links, schema.events
    joined: set[str] = set()
    for anon, uid in links.items():
        changed = await conn.execute(
            sa.update(al).where(al.c.anonymous_id == anon).values(user_id=uid, linked_at=now))
        if changed.rowcount == 0:
            await conn.execute(sa.insert(al).values(anonymous_id=anon, user_id=uid,
                                                    linked_at=now))
        moved = await conn.execute(
            sa.update(ev).where(ev.c.anonymous_id == anon, ev.c.user_id.is_(None))
            .values(user_id=uid))
        if moved.rowcount:
            joined.add(uid)
    return joined


async def resolve_anonymous(conn: AsyncConnection, anonymous_ids: Iterable[str]) -> dict[str, str]:
    """The users already linked to these anonymous ids."""
    al = schema.anonymous_links
    out: dict[str, str] = {}
    for chunk in _chunks(sorted(set(anonymous_ids))):
        rows = await conn.execute(sa.select(al.c.anonymous_id, al.c.user_id)
                                  .where(al.c.anonymous_id.in_(chunk)))
        out.update({a: u for a, u in rows})
    return out


async def read_user(conn: AsyncConnection, user_id: str) -> UserView | None:
    """The user with their current segments and their campaign instances, or None."""
    u, sm, fi = schema.users, schema.segment_members, schema.flow_instances
    row = (await conn.execute(sa.select(u).where(u.c.id == user_id))).first()
    if row is None:
        return None
    segs = await conn.execute(sa.select(sm.c.segment, sm.c.entered_at)
                              .where(sm.c.user_id == user_id).order_by(sm.c.segment))
    flows = await conn.execute(
        sa.select(fi.c.id, fi.c.campaign, fi.c.status, fi.c.version, fi.c.created_at,
                  fi.c.updated_at, fi.c.ended_at, fi.c.wake_at)
        .where(fi.c.user_id == user_id).order_by(fi.c.id))
    return UserView(
        id=row.id, email=row.email, attributes=dict(row.attributes or {}),
        created_at=row.created_at, updated_at=row.updated_at,
        segments=tuple({"segment": s, "entered_at": _iso(at)} for s, at in segs),
        campaigns=tuple(
            {"instance": f.id, "campaign": f.campaign, "status": f.status, "version": f.version,
             "started_at": _iso(f.created_at), "updated_at": _iso(f.updated_at),
             "ended_at": _iso(f.ended_at), "wake_at": _iso(f.wake_at)}
            for f in flows),
    )


async def forget_user(conn: AsyncConnection, user_id: str, now: dt.datetime) -> bool:
    """Delete everything Segflow holds about the user; True if they existed.

    Events, memberships and their history, subscriptions, anonymous links and the
    journals of their flows are deleted; their flow instances end as ``exited`` (kept,
    so campaign counts stay true) and their messages keep only what is not personal.
    """
    s = schema
    existed = (await conn.execute(sa.delete(s.users).where(s.users.c.id == user_id))).rowcount
    await conn.execute(sa.delete(s.events).where(s.events.c.user_id == user_id))
    anon = [a for (a,) in await conn.execute(
        sa.select(s.anonymous_links.c.anonymous_id)
        .where(s.anonymous_links.c.user_id == user_id))]
    for chunk in _chunks(anon):
        # Events still anonymous under an id linked to this user are theirs too.
        await conn.execute(sa.delete(s.events).where(s.events.c.anonymous_id.in_(chunk)))
    await conn.execute(sa.delete(s.anonymous_links)
                       .where(s.anonymous_links.c.user_id == user_id))
    await conn.execute(sa.delete(s.segment_members)
                       .where(s.segment_members.c.user_id == user_id))
    await conn.execute(sa.delete(s.segment_changes)
                       .where(s.segment_changes.c.user_id == user_id))
    await conn.execute(sa.delete(s.subscriptions).where(s.subscriptions.c.user_id == user_id))
    fi = s.flow_instances
    instance_ids = [i for (i,) in await conn.execute(
        sa.select(fi.c.id).where(fi.c.user_id == user_id))]
    for start in range(0, len(instance_ids), _IN_CHUNK):
        chunk_ids = instance_ids[start:start + _IN_CHUNK]
        await conn.execute(sa.delete(s.flow_journal)
                           .where(s.flow_journal.c.instance_id.in_(chunk_ids)))
    await conn.execute(
        sa.update(fi).where(fi.c.user_id == user_id, fi.c.live.is_not(None))
        .values(status="exited", live=None, wake_at=None, wait_event=None, ended_at=now,
                updated_at=now))
    await conn.execute(
        sa.update(s.engagement).where(s.engagement.c.user_id == user_id).values(user_id=None))
    m = s.messages
    await conn.execute(sa.update(m).where(m.c.user_id == user_id)
                       .values(user_id=None, to_address=None, data=None, updated_at=now))
    return bool(existed)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"
