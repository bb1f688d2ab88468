"""Merging two users into one: Customer.io's ``POST /api/v1/merge_customers``.

The secondary user is folded into the primary in one store transaction, and then
deleted:

* attributes: the secondary's are added to the primary's; the primary wins on a key
  both have. ``users.created_at`` becomes the earlier of the two (the person signed up
  then), ``users.email`` follows the merged ``email`` attribute;
* events, anonymous links, push devices, messages and their engagement, and flow
  instances become the primary's; the secondary's live flow instances end first (as
  ``exited``, as a forget ends them), so no step of theirs runs again;
* subscriptions: a topic either of them unsubscribed from stays unsubscribed;
* the secondary's segment memberships and history and audience memberships are deleted
  (the segment engine reports the exits and evaluates the primary again; an audience
  sync gives the primary what its source says).

Unlike a forget no tombstone is written: the secondary's id may be used again, for a new
user. Both user rows are locked (in id order, as the committer takes them) before
anything is read, so a writer that share-locks a user (:mod:`segflowd.userlocks`)
either sees the merge whole or waits for it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import schema
from . import users
from .devices import move_devices

__all__ = ["MergeError", "Merged", "merge_users"]


class MergeError(Exception):
    """The merge cannot be done: ``field`` names the identifier at fault (a 404)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class Merged:
    primary: str
    secondary: str
    left: tuple[str, ...]  # the secondary's segments (their memberships were deleted)
    events: int  # events that became the primary's
    added: Mapping[str, object]  # the secondary's attributes the primary did not have


async def merge_users(conn: AsyncConnection, primary: str, secondary: str,
                      now: dt.datetime) -> Merged:
    """Fold ``secondary`` into ``primary`` inside the caller's transaction."""
    s = schema
    u = s.users
    rows = {r.id: r for r in await conn.execute(
        sa.select(u.c.id, u.c.attributes, u.c.created_at).where(u.c.id.in_([primary, secondary]))
        .order_by(u.c.id).with_for_update())}
    for field, uid in (("primary", primary), ("secondary", secondary)):
        if uid not in rows:
            raise MergeError(field, f"no user {uid!r}")
    keep, gone = rows[primary], rows[secondary]
    mine = dict(keep.attributes or {})
    added = {k: v for k, v in dict(gone.attributes or {}).items() if k not in mine}
    attributes = {**mine, **added}
    # Deleted first, as a forget does: a share-locking writer waits, then finds no user.
    await conn.execute(sa.delete(u).where(u.c.id == secondary))
    await conn.execute(sa.update(u).where(u.c.id == primary).values(
        attributes=attributes, email=users.email_of(attributes), updated_at=now,
        created_at=min(keep.created_at, gone.created_at)))
    moved = await conn.execute(sa.update(s.events).where(s.events.c.user_id == secondary)
                               .values(user_id=primary))
    await conn.execute(sa.update(s.anonymous_links)
                       .where(s.anonymous_links.c.user_id == secondary)
                       .values(user_id=primary))
    await move_devices(conn, secondary, primary, now)
    left = tuple(sorted({str(seg) for (seg,) in await conn.execute(
        sa.select(s.segment_members.c.segment)
        .where(s.segment_members.c.user_id == secondary).with_for_update())}))
    for table in (s.segment_members, s.segment_changes, s.audience_members):
        await conn.execute(sa.delete(table).where(table.c.user_id == secondary))
    await _merge_subscriptions(conn, primary, secondary, now)
    await _end_instances(conn, primary, secondary, now)
    await conn.execute(sa.update(s.messages).where(s.messages.c.user_id == secondary)
                       .values(user_id=primary))
    await conn.execute(sa.update(s.engagement).where(s.engagement.c.user_id == secondary)
                       .values(user_id=primary))
    await conn.execute(sa.update(s.conversions).where(s.conversions.c.user_id == secondary)
                       .values(user_id=primary))
    # Experiment assignments: the primary's stand; the secondary's others become theirs.
    fs = s.flow_splits.c
    ours = [(str(c), str(n)) for c, n in await conn.execute(
        sa.select(fs.campaign, fs.name).where(fs.user_id == primary))]
    for campaign, name in ours:
        await conn.execute(sa.delete(s.flow_splits).where(
            fs.user_id == secondary, fs.campaign == campaign, fs.name == name))
    await conn.execute(sa.update(s.flow_splits).where(fs.user_id == secondary)
                       .values(user_id=primary))
    return Merged(primary=primary, secondary=secondary, left=left,
                  events=int(moved.rowcount), added=added)


async def _merge_subscriptions(conn: AsyncConnection, primary: str, secondary: str,
                               now: dt.datetime) -> None:
    """The secondary's topics become the primary's; an unsubscribe of either holds."""
    sub = schema.subscriptions
    mine = {str(r.topic): r.unsubscribed_at for r in await conn.execute(
        sa.select(sub.c.topic, sub.c.unsubscribed_at).where(sub.c.user_id == primary)
        .with_for_update())}
    theirs = (await conn.execute(sa.select(sub.c.topic, sub.c.unsubscribed_at)
                                 .where(sub.c.user_id == secondary))).all()
    await conn.execute(sa.delete(sub).where(sub.c.user_id == secondary))
    for topic, unsubscribed in theirs:
        if topic not in mine:
            await conn.execute(sa.insert(sub).values(
                user_id=primary, topic=topic, unsubscribed_at=unsubscribed, updated_at=now))
        elif unsubscribed is not None and mine[topic] is None:
            await conn.execute(sa.update(sub).where(sub.c.user_id == primary,
                                                    sub.c.topic == topic)
                               .values(unsubscribed_at=unsubscribed, updated_at=now))


async def _end_instances(conn: AsyncConnection, primary: str, secondary: str,
                         now: dt.datetime) -> None:
    """End the secondary's live flow instances, then give all of theirs to the primary.

    Ended first, so UNIQUE(campaign, user_id, live) cannot collide with a live instance
    of the primary in the same campaign.
    """
    fi = schema.flow_instances
    await conn.execute(
        sa.update(fi).where(fi.c.user_id == secondary, fi.c.live.is_not(None))
        .values(status="exited", live=None, wake_at=None, wait_event=None, ended_at=now,
                updated_at=now))
    await conn.execute(sa.update(fi).where(fi.c.user_id == secondary).values(user_id=primary))
