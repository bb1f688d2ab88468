"""Store operations on users: merge attributes, link anonymous ids, read, forget.

Every function takes an open connection inside the caller's transaction, so the group
committer can run many of them in one commit and nothing is half-written on failure.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import functools
import hashlib
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import email_validator
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import schema
from ..phones import PHONE_ATTRIBUTE, phone_error, phone_of
from ..store import Store
from .devices import devices_of

__all__ = [
    "FORGOTTEN",
    "TOMBSTONE_PREFIX",
    "Forgotten",
    "UserView",
    "check_email",
    "clear_tombstones",
    "email_error",
    "forget",
    "forget_user",
    "forgotten_among",
    "id_hash",
    "link_anonymous",
    "merge_attributes",
    "read_user",
    "resolve_anonymous",
    "tombstone",
    "upsert_users",
    "with_phone",
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
    devices: tuple[Mapping[str, object], ...] = ()  # push tokens (segflowd.ingest.devices)
    messages: tuple[Mapping[str, object], ...] = ()  # the latest USER_MESSAGES, newest first

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id, "email": self.email,
            "email_error": email_error(self.email, self.attributes),
            "phone_error": phone_error(self.attributes),
            "attributes": dict(self.attributes),
            "created_at": _iso(self.created_at), "updated_at": _iso(self.updated_at),
            "segments": [dict(s) for s in self.segments],
            "campaigns": [dict(c) for c in self.campaigns],
            "devices": [dict(d) for d in self.devices],
            "messages": [dict(m) for m in self.messages],
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


EMAIL_CHECK_CACHE = 4096  # addresses: a delivery batch checks the same ones again


@functools.lru_cache(maxsize=EMAIL_CHECK_CACHE)
def check_email(value: str) -> tuple[str, str | None]:
    """``(normalised address, None)`` for a valid email address, else ``(value, why)``.

    Syntax only, never DNS (email-validator with ``check_deliverability=False``): the
    domain is lower-cased and Unicode-normalised (an internationalised one stays in
    Unicode; delivery sends it as IDNA), the local part is kept as written. A non-ASCII
    local part is valid here (it needs SMTPUTF8 to be delivered, see delivery). A value
    with a display name (``Ann Lee <ann@example.org>``) is kept as written when its
    address is valid; a line break or other control character is never valid.
    """
    if any(not c.isprintable() for c in value):
        return value, (f"{value!r} is not a valid email address: it contains a line break "
                       "or another control character")
    try:
        valid = email_validator.validate_email(value, check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        pairs = email.utils.getaddresses([value])
        addr = pairs[0][1] if len(pairs) == 1 else ""
        if addr and value.endswith(f"<{addr}>") and addr != value:
            problem = check_email(addr)[1]  # Name <address>: the address must be valid
            return value, None if problem is None else problem
        return value, f"{value!r} is not a valid email address: {exc}"
    return valid.normalized, None


def email_of(attributes: Mapping[str, object]) -> str | None:
    """The value kept in ``users.email``: ``attributes["email"]`` when it is a string,
    normalised when it is a valid address (:func:`check_email`) and kept as written (then
    :func:`email_error` says why) when it is not: the user is stored either way."""
    value = attributes.get("email")
    if isinstance(value, str) and value.strip():
        return check_email(value.strip())[0][:EMAIL_MAX]
    return None


def with_phone(attributes: dict[str, object]) -> dict[str, object]:
    """``attributes`` with a valid ``phone`` in E.164 (``+1 (415) 555-0100`` becomes
    ``+14155550100``, what SMS providers and their replies use); an invalid one is kept
    as written, and ``GET /v1/users/{id}`` shows why as ``phone_error``."""
    phone = phone_of(attributes)
    if phone is not None and phone != attributes.get(PHONE_ATTRIBUTE):
        return {**attributes, PHONE_ATTRIBUTE: phone}
    return attributes


def email_error(address: str | None, attributes: Mapping[str, object]) -> str | None:
    """Why the user's address (``users.email``) is not a valid one, or None (also when
    there is none): ``GET /v1/users/{id}`` shows it, and delivery fails the user's
    messages with the same reason, without contacting the provider."""
    if address is None:
        value = attributes.get("email")
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return "the email attribute is not a string"
        return None
    return check_email(address)[1]


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i:i + _IN_CHUNK]


async def upsert_users(store: Store, conn: AsyncConnection,
                       changes: Mapping[str, list[Mapping[str, object]]],
                       now: dt.datetime,
                       signups: Mapping[str, dt.datetime] | None = None) -> None:
    """Create or update each user in ``changes`` (user id → attribute changes, in order).

    ``signups`` (user id → signup time) sets ``users.created_at`` of those users, new or
    known; any other new user's is ``now``.

    An empty list of changes only makes sure the user exists (one INSERT IGNORE, no
    read). Changed users are read and written back in this transaction; the caller (the
    one group committer per process) is the only writer of user attributes, so no update
    is lost between the read and the write.
    """
    if not changes:
        return
    u = schema.users
    # In id order, as share-locking readers take them (segflowd.userlocks): fewer deadlocks.
    signups = signups or {}
    ensure = sorted(uid for uid, c in changes.items() if not c and uid not in signups)
    if ensure:
        await conn.execute(store.insert_ignore(u), [
            {"id": uid, "email": None, "attributes": {}, "created_at": now, "updated_at": now}
            for uid in ensure])
    ids = sorted(uid for uid, c in changes.items() if c or uid in signups)
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
        attrs = with_phone(attrs)
        row = {"attributes": attrs, "email": email_of(attrs), "updated_at": now}
        if uid in existing:
            updates.append({"b_id": uid, **row})
        else:
            inserts.append({"id": uid, "created_at": signups.get(uid, now), **row})
    if inserts:
        await conn.execute(sa.insert(u), inserts)
    if updates:
        await conn.execute(
            sa.update(u).where(u.c.id == sa.bindparam("b_id"))
            .values(attributes=sa.bindparam("attributes"), email=sa.bindparam("email"),
                    updated_at=sa.bindparam("updated_at")),
            updates,
        )
    dated = [{"b_id": uid, "b_created": signups[uid]} for uid in ids
             if uid in existing and uid in signups]
    if dated:
        await conn.execute(sa.update(u).where(u.c.id == sa.bindparam("b_id"))
                           .values(created_at=sa.bindparam("b_created")), dated)


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
        devices=tuple(await devices_of(conn, user_id)),
        messages=tuple(await _messages_of(conn, user_id)),
    )


USER_MESSAGES = 20  # messages GET /v1/users/{id} shows, newest first


async def _messages_of(conn: AsyncConnection, user_id: str) -> list[dict[str, object]]:
    """The user's latest messages: to whom each went (``to``: null until delivery records
    the address it used), its status and its last error."""
    m = schema.messages.c
    rows = await conn.execute(
        sa.select(m.id, m.kind, m.channel, m.campaign, m.transaction, m.template,
                  m.to_address, m.status, m.last_error, m.response, m.created_at, m.sent_at)
        .where(m.user_id == user_id).order_by(m.id.desc()).limit(USER_MESSAGES))
    return [{"id": int(r.id), "kind": r.kind, "channel": r.channel, "campaign": r.campaign,
             "transaction": r.transaction, "template": r.template, "to": r.to_address,
             "status": r.status, "error": r.last_error, "created_at": _iso(r.created_at),
             "sent_at": _iso(r.sent_at), **_delivery(r.channel, r.response)} for r in rows]


def _delivery(channel: str, response: object) -> dict[str, object]:
    """An SMS's delivery report (``delivered``, ``undelivered``...), a webhook's status."""
    if not isinstance(response, dict):
        return {}
    if channel == "sms" and "delivery" in response:
        return {"delivery": response["delivery"]}
    if channel == "webhook" and "status" in response:
        return {"response_status": response["status"]}
    return {}


async def forget_user(conn: AsyncConnection, user_id: str, now: dt.datetime) -> bool:
    """:func:`forget` the user; True if they existed."""
    return (await forget(conn, user_id, now)).existed


@dataclasses.dataclass(frozen=True)
class Forgotten:
    """What :func:`forget` did: whether the user existed, the segments they left, and
    their message rows."""

    existed: bool
    segments: tuple[str, ...]
    messages: tuple[int, ...] = ()  # their message rows (a provider may hold copies)


async def forget(conn: AsyncConnection, user_id: str, now: dt.datetime) -> Forgotten:
    """Delete everything Segflow holds about the user.

    Deleted: the user, their events and those still anonymous under an id linked to them
    (an event another user owns stays theirs), anonymous links, segment memberships and
    history, audience memberships, subscriptions, push devices, experiment assignments
    and the journals of their flows.

    Kept, without what is personal, so campaign counts stay true: their flow instances
    (ended as ``exited`` if live; ``start_data`` and ``error`` cleared; the user id
    replaced by one random :func:`tombstone`, so a new user of the same id starts afresh)
    and their messages (user, address, data and error cleared; a queued or claimed one is
    ``failed`` with :data:`FORGOTTEN` instead of being sent). Clicks lose their URL;
    conversions their user id.
    Suppressions are kept: they are by address, so a bounced or complaining address is
    never mailed again.
    """
    s = schema
    tomb = tombstone()
    existed = (await conn.execute(sa.delete(s.users).where(s.users.c.id == user_id))).rowcount
    ev = s.events
    await conn.execute(sa.delete(ev).where(ev.c.user_id == user_id))
    anon = [a for (a,) in await conn.execute(
        sa.select(s.anonymous_links.c.anonymous_id)
        .where(s.anonymous_links.c.user_id == user_id))]
    for chunk in _chunks(anon):
        # Events still anonymous under an id linked to this user are theirs too; one given
        # to another user (the same browser, identified as them first) is not.
        await conn.execute(sa.delete(ev).where(ev.c.anonymous_id.in_(chunk),
                                               ev.c.user_id.is_(None)))
    # A locking read (MySQL), as the DELETE below would take anyway: a membership an
    # evaluation or a refresh has written and not committed yet is waited for and seen.
    # One written after this point by a reader that saw the user before this commits is
    # swept by the segment engine (see segflowd.segments.engine).
    left = tuple(sorted({str(seg) for (seg,) in await conn.execute(
        sa.select(s.segment_members.c.segment).where(s.segment_members.c.user_id == user_id)
        .with_for_update())}))
    for table in (s.anonymous_links, s.segment_members, s.segment_changes, s.subscriptions,
                  s.audience_members, s.devices, s.flow_splits):
        await conn.execute(sa.delete(table).where(table.c.user_id == user_id))
    await _forget_instances(conn, user_id, tomb, now)
    sent = await _forget_messages(conn, user_id, tomb, now)
    await conn.execute(sa.update(s.engagement).where(s.engagement.c.user_id == user_id)
                       .values(user_id=None, url=None))
    await conn.execute(sa.update(s.conversions).where(s.conversions.c.user_id == user_id)
                       .values(user_id=None))
    await _forget_broadcast_positions(conn, user_id)
    # The tombstone ingest checks: late events and identifies of the id are refused.
    fg = s.forgotten
    await conn.execute(sa.delete(fg).where(fg.c.id_hash == id_hash(user_id)))
    await conn.execute(sa.insert(fg).values(id_hash=id_hash(user_id), forgotten_at=now))
    return Forgotten(existed=bool(existed), segments=left, messages=sent)


def id_hash(user_id: str) -> str:
    """``forgotten.id_hash`` of a user id: its SHA-256, in hex.

    Unlike :func:`tombstone` this is reproducible, as it must be to recognise the id
    again; a guessable id can be confirmed as recently forgotten by whoever reads the
    store, which is why the row goes once ``[retention] forget_window`` has passed.
    """
    return hashlib.sha256(user_id.encode()).hexdigest()


async def forgotten_among(conn: AsyncConnection, user_ids: Iterable[str],
                          since: dt.datetime | None) -> set[str]:
    """Those of ``user_ids`` forgotten at ``since`` or later (any time, with None)."""
    fg = schema.forgotten
    by_hash = {id_hash(uid): uid for uid in user_ids}
    out: set[str] = set()
    for chunk in _chunks(sorted(by_hash)):
        query = sa.select(fg.c.id_hash).where(fg.c.id_hash.in_(chunk))
        if since is not None:
            query = query.where(fg.c.forgotten_at >= since)
        out.update(by_hash[h] for (h,) in await conn.execute(query))
    return out


async def clear_tombstones(conn: AsyncConnection, user_ids: Iterable[str]) -> None:
    """Drop the tombstones of ``user_ids``: they are users again (an explicit re-create)."""
    fg = schema.forgotten
    for chunk in _chunks(sorted({id_hash(uid) for uid in user_ids})):
        await conn.execute(sa.delete(fg).where(fg.c.id_hash.in_(chunk)))


TOMBSTONE_PREFIX = "forgotten:"
FORGOTTEN = "the user was forgotten"  # last_error of their messages that were still queued


def tombstone() -> str:
    """A fresh stand-in for a forgotten user's id on the rows kept for counts.

    Random, not a hash of the id: a hash of a guessable id (a number, an address) could
    be reversed by trying candidates.
    """
    return TOMBSTONE_PREFIX + secrets.token_hex(8)


def _rekey(key: str, user_id: str, tomb: str, row_id: int) -> str:
    """A dedupe or start key without the user id: ``bc:<broadcast>:<user>`` keeps its
    shape (retention reads the broadcast from it); any other key may hold anything."""
    head, _, rest = key.partition(":")
    number, _, who = rest.partition(":")
    if head == "bc" and number.isdigit() and who == user_id:
        return f"bc:{number}:{tomb}"
    return f"{tomb}:{row_id}"


async def _forget_instances(conn: AsyncConnection, user_id: str, tomb: str,
                            now: dt.datetime) -> None:
    fi, fj = schema.flow_instances, schema.flow_journal
    rows = (await conn.execute(sa.select(fi.c.id, fi.c.start_key)
                               .where(fi.c.user_id == user_id))).all()
    ids = [int(r.id) for r in rows]
    for start in range(0, len(ids), _IN_CHUNK):
        await conn.execute(sa.delete(fj).where(fj.c.instance_id.in_(ids[start:start + _IN_CHUNK])))
    await conn.execute(
        sa.update(fi).where(fi.c.user_id == user_id, fi.c.live.is_not(None))
        .values(status="exited", live=None, wake_at=None, wait_event=None, ended_at=now,
                updated_at=now))
    keyed = [{"b_id": int(r.id), "b_key": _rekey(r.start_key, user_id, tomb, int(r.id))}
             for r in rows if r.start_key is not None]
    if keyed:
        await conn.execute(sa.update(fi).where(fi.c.id == sa.bindparam("b_id"))
                           .values(start_key=sa.bindparam("b_key")), keyed)
    # Ended above, so UNIQUE(campaign, user_id, live) cannot collide on the tombstone.
    await conn.execute(sa.update(fi).where(fi.c.user_id == user_id)
                       .values(user_id=tomb, start_data=None, error=None))


async def _forget_messages(conn: AsyncConnection, user_id: str, tomb: str,
                           now: dt.datetime) -> tuple[int, ...]:
    m = schema.messages
    ids = tuple(sorted(int(i) for (i,) in await conn.execute(
        sa.select(m.c.id).where(m.c.user_id == user_id))))
    keyed = [{"b_id": int(r.id), "b_key": _rekey(r.dedupe_key, user_id, tomb, int(r.id))}
             for r in await conn.execute(sa.select(m.c.id, m.c.dedupe_key).where(
                 m.c.user_id == user_id, m.c.dedupe_key.like("bc:%")))]
    if keyed:
        await conn.execute(sa.update(m).where(m.c.id == sa.bindparam("b_id"))
                           .values(dedupe_key=sa.bindparam("b_key")), keyed)
    cleared = {"user_id": None, "to_address": None, "data": None, "response": None,
               "updated_at": now}
    # Not yet handed to the provider: never sent (delivery sends a claimed row only if it
    # is still claimed when marked `sending`). A row being sent finishes as it goes.
    await conn.execute(sa.update(m).where(m.c.user_id == user_id,
                                          m.c.status.in_(("queued", "claimed")))
                       .values(status="failed", next_attempt_at=None, last_error=FORGOTTEN,
                               **cleared))
    # Provider errors quote the address ("550 <ann@example.com>: no such user").
    await conn.execute(sa.update(m).where(m.c.user_id == user_id)
                       .values(last_error=None, **cleared))
    return ids


async def _forget_broadcast_positions(conn: AsyncConnection, user_id: str) -> None:
    """A broadcast resumes after ``broadcasts.after``, a user id: step it back to the
    member before the forgotten one, where resuming gives the same next member."""
    b, sm = schema.broadcasts, schema.segment_members
    for bid, segment in (await conn.execute(
            sa.select(b.c.id, b.c.segment).where(b.c.after == user_id))).all():
        before = (await conn.execute(
            sa.select(sa.func.max(sm.c.user_id))
            .where(sm.c.segment == segment, sm.c.user_id < user_id))).scalar_one_or_none()
        await conn.execute(sa.update(b).where(b.c.id == bid).values(after=before))


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"
