"""The writes ingest commits, and how one flush applies them.

A request hands :class:`GroupCommitter <segflowd.ingest.committer.GroupCommitter>` a
sequence of :data:`Write`; :func:`apply_writes` turns a flush's worth of them (many
requests) into the statements of one transaction and answers each request with a
:class:`CommitResult`: the id of each event it stored, and which were duplicates (dropped
within the flush, or skipped by the insert because the dedupe key was already stored).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import schema
from ..hooks import IngestBatch, StoredEvent
from ..store import Store
from . import users
from .eventinsert import COLUMNS, EventInserter

__all__ = [
    "CommitResult",
    "EventWrite",
    "ForgetWrite",
    "LinkWrite",
    "UserWrite",
    "Write",
    "apply_writes",
    "events_only",
]

_IN_CHUNK = 500  # dedupe keys per IN (...) list
# How recent a stored event must be for a duplicate of it to reach the engines again (a
# client retrying a request whose reply it lost does so within minutes).
REDELIVER_WINDOW = dt.timedelta(hours=1)


@dataclasses.dataclass(frozen=True)
class UserWrite:
    """Create the user or merge ``attributes`` into theirs (``None`` removes a key).

    With ``recreate`` (``PUT /v1/users/{id}``) a recently forgotten user is created
    again and their tombstone dropped; without it (an identify) the request is refused.
    """

    user_id: str
    attributes: Mapping[str, object]
    recreate: bool = False
    # The signup time a client gave (a createdAt / created_at trait, naive UTC): it
    # becomes users.created_at. None: a new user's is the time received, a known one's
    # stays.
    created_at: dt.datetime | None = None


@dataclasses.dataclass(frozen=True)
class EventWrite:
    """Store an event once: a second write with the same ``dedupe_key`` stores nothing."""

    name: str
    attributes: Mapping[str, object]
    created_at: dt.datetime | None  # the client's time (naive UTC); None: received time
    user_id: str | None = None
    anonymous_id: str | None = None
    dedupe_key: str | None = None


@dataclasses.dataclass(frozen=True)
class LinkWrite:
    """``anonymous_id`` is ``user_id``: their anonymous events become theirs."""

    anonymous_id: str
    user_id: str


@dataclasses.dataclass(frozen=True)
class ForgetWrite:
    """Forget the user and everything of theirs."""

    user_id: str


Write = UserWrite | EventWrite | LinkWrite | ForgetWrite


@dataclasses.dataclass(frozen=True)
class CommitResult:
    """What one request's writes became: per EventWrite, its row id and whether new.

    ``refused`` names the recently forgotten users the request wrote to: when it is not
    empty nothing of the request was written.
    """

    event_ids: tuple[int | None, ...]
    duplicates: tuple[bool, ...]
    forgotten: tuple[bool, ...]
    refused: tuple[str, ...] = ()



def events_only(groups: list[Sequence[Write]], known: set[str]) -> bool:
    """True when committing ``groups`` writes events rows and nothing else.

    That is: only events, each of a user known to exist (no INSERT IGNORE of the user,
    no anonymous id to resolve).
    """
    for writes in groups:
        for w in writes:
            if type(w) is not EventWrite or w.user_id is None or w.user_id not in known:
                return False
    return True


async def apply_writes(store: Store, conn: AsyncConnection, groups: list[Sequence[Write]],
                       now: dt.datetime, returning: bool, known: set[str],
                       inserter: EventInserter, *, alone: bool = False,
                       forgotten_since: dt.datetime | None = None,
                       refuse_forgotten: bool = False) -> tuple[list[CommitResult], IngestBatch]:
    """Apply every group's writes in order of kind, within one transaction.

    With ``alone`` the writes are events only (:func:`events_only`) and the inserter's
    INSERT is the transaction, so ``conn`` must have none open.

    With ``refuse_forgotten``, a group writing to a user forgotten at ``forgotten_since``
    or later (any time, with None) is refused whole (:attr:`CommitResult.refused`),
    unless a ``recreate`` write of this flush made them a user again.
    """
    ev = schema.events
    touched: set[str] = set()
    deleted: set[str] = set()
    user_changes: dict[str, list[Mapping[str, object]]] = {}
    signups: dict[str, dt.datetime] = {}  # user id -> the latest signup time given
    links: dict[str, str] = {}
    events: list[EventWrite] = []
    forget = [w.user_id for writes in groups for w in writes if isinstance(w, ForgetWrite)]

    # Forget first: a request that forgets a user and a later one that recreates them in
    # the same flush both hold (the newer data survives); and the tombstones written
    # here refuse any other write to them in this flush.
    forgotten: dict[str, bool] = {}
    left: dict[str, tuple[str, ...]] = {}
    sent: list[int] = []
    for uid in forget:
        gone = await users.forget(conn, uid, now)
        forgotten[uid] = forgotten.get(uid, False) or gone.existed
        left[uid] = tuple(sorted({*left.get(uid, ()), *gone.segments}))
        sent += gone.messages
        deleted.add(uid)
    refused = {} if not refuse_forgotten else await _refuse_forgotten(
        conn, groups, known.difference(forget), forgotten_since)
    for gi, writes in enumerate(groups):
        if gi in refused:
            continue
        for w in writes:
            if isinstance(w, UserWrite):
                user_changes.setdefault(w.user_id, []).append(w.attributes)
                if w.created_at is not None:
                    signups[w.user_id] = w.created_at
            elif isinstance(w, EventWrite):
                events.append(w)
            elif isinstance(w, LinkWrite):
                links[w.anonymous_id] = w.user_id
                user_changes.setdefault(w.user_id, [])

    # Anonymous events of ids already linked (or linked in this flush) belong to the user.
    anon_only = {e.anonymous_id for e in events if e.user_id is None and e.anonymous_id}
    resolved = await users.resolve_anonymous(conn, anon_only - set(links)) if anon_only else {}
    resolved.update(links)

    def owner(e: EventWrite) -> str | None:
        if e.user_id is not None:
            return e.user_id
        return resolved.get(e.anonymous_id) if e.anonymous_id else None

    exists = known.difference(forget) if forget else known
    for e in events:
        who = owner(e)
        if who is not None:
            touched.add(who)
            if who not in exists:
                user_changes.setdefault(who, [])
    await users.upsert_users(store, conn, user_changes, now, signups)
    touched.update(user_changes)

    # Repeats inside this flush are dropped here; keys already stored are skipped by the
    # insert itself (INSERT IGNORE / ON CONFLICT DO NOTHING), which returns only new rows.
    rows: list[tuple[Any, ...]] = []  # values in eventinsert.COLUMNS order
    slots: list[int] = []  # index into `events` of each row offered to the insert
    in_batch: dict[str, int] = {}
    for idx, e in enumerate(events):
        if e.dedupe_key:
            if e.dedupe_key in in_batch:
                continue
            in_batch[e.dedupe_key] = idx
        attrs = e.attributes
        rows.append((owner(e), e.anonymous_id, e.name,
                     attrs if type(attrs) is dict else dict(attrs), e.dedupe_key,
                     e.created_at or now, now))
        slots.append(idx)
    new_id: dict[int, int] = {}  # index into `events` → new row id
    seen: dict[str, int] | None = None  # stored id of each dedupe key skipped, if looked up
    if rows and returning:
        if inserter.supported:
            inserted: Iterable[tuple[int, str | None]]
            inserted, seen = await inserter.insert(conn, rows, alone=alone)
        else:
            inserted = await conn.execute(
                store.insert_ignore(ev).returning(ev.c.id, ev.c.dedupe_key),
                [dict(zip(COLUMNS, row, strict=True)) for row in rows])
        by_key: dict[str, int] = {}
        keyless: list[int] = []
        for row_id, key in inserted:
            if key is None:
                keyless.append(row_id)
            else:
                by_key[key] = row_id
        keyless.sort()  # auto-increment ids follow the order of the VALUES rows
        unkeyed = iter(keyless)
        for idx, row in zip(slots, rows, strict=True):
            key = row[4]
            if key is None:
                new_id[idx] = next(unkeyed)
            elif key in by_key:
                new_id[idx] = by_key[key]
    elif rows:  # pragma: no cover - MySQL proper has no INSERT ... RETURNING
        for idx, row in zip(slots, rows, strict=True):
            done = await conn.execute(store.insert_ignore(ev), dict(zip(COLUMNS, row, strict=True)))
            if done.rowcount == 1 and done.inserted_primary_key:
                new_id[idx] = int(done.inserted_primary_key[0])
    if seen is None:
        seen = {}
        skipped = sorted(k for k, idx in in_batch.items() if idx not in new_id)
        for i in range(0, len(skipped), _IN_CHUNK):
            chunk = skipped[i:i + _IN_CHUNK]
            for key, row_id in await conn.execute(
                    sa.select(ev.c.dedupe_key, ev.c.id).where(ev.c.dedupe_key.in_(chunk))):
                seen[key] = row_id

    if links:
        touched |= await users.link_anonymous(conn, links, now)

    stored: list[StoredEvent] = []
    for idx in slots:
        if idx not in new_id:
            continue
        row_id = new_id[idx]
        e = events[idx]
        stored.append(StoredEvent(id=row_id, user_id=owner(e), anonymous_id=e.anonymous_id,
                                  name=e.name, attributes=e.attributes,
                                  created_at=e.created_at or now, received_at=now))

    # A key stored shortly before this flush is most likely a client's retry, and the
    # first try may have been committed with its reply lost (a 503 after COMMIT): the
    # engines were never told of it. They are now, as stored; each acts on an event id
    # once (a transactional message by its key, a flow wake by the wait it matched, a
    # segment by evaluating again). An older duplicate (a replay, a backfill) is not news.
    again = sorted(v for k, v in seen.items()
                   if in_batch.get(k) is not None and in_batch[k] not in new_id)
    if again:
        stored.extend(await _recent_events(conn, again, now))
    stored.sort(key=lambda s: s.id)

    # Per-request results, in the order of each request's event writes.
    results: list[CommitResult] = []
    pos = 0
    for gi, writes in enumerate(groups):
        if gi in refused:
            results.append(CommitResult((), (), (), refused[gi]))
            continue
        eids: list[int | None] = []
        dups: list[bool] = []
        forg: list[bool] = []
        for w in writes:
            if isinstance(w, EventWrite):
                if pos in new_id:
                    eids.append(new_id[pos])
                    dups.append(False)
                else:
                    key = w.dedupe_key or ""
                    eids.append(seen.get(key, new_id.get(in_batch.get(key, -1))))
                    dups.append(True)
                pos += 1
            elif isinstance(w, ForgetWrite):
                forg.append(forgotten.get(w.user_id, False))
        results.append(CommitResult(tuple(eids), tuple(dups), tuple(forg)))
    touched -= deleted - set(user_changes)
    return results, IngestBatch(users=frozenset(touched), events=tuple(stored),
                                deleted=frozenset(deleted),
                                left={u: segs for u, segs in left.items() if segs},
                                forgotten_messages=tuple(sent))


def _targets(writes: Sequence[Write]) -> set[str]:
    """The users a request writes to without re-creating them."""
    out: set[str] = set()
    for w in writes:
        if isinstance(w, UserWrite):
            if not w.recreate:
                out.add(w.user_id)
        elif isinstance(w, LinkWrite | EventWrite) and w.user_id is not None:
            out.add(w.user_id)
    return out


async def _refuse_forgotten(conn: AsyncConnection, groups: list[Sequence[Write]],
                            exists: set[str], since: dt.datetime | None
                            ) -> dict[int, tuple[str, ...]]:
    """Index of each group to refuse → the forgotten users it names.

    A forget of this flush counts (its tombstone is written before this check); a
    ``recreate`` write clears the tombstone here, so the flush's other writes to the user
    hold.
    A user known to exist has no tombstone (a forget or a re-create removes it), so the
    events-only flush of known users reads nothing more.
    """
    recreate = {w.user_id for writes in groups for w in writes
                if isinstance(w, UserWrite) and w.recreate}
    if recreate:
        await users.clear_tombstones(conn, recreate)
    wanted: dict[int, set[str]] = {}
    for gi, writes in enumerate(groups):
        ids = _targets(writes) - recreate - exists
        if ids:
            wanted[gi] = ids
    if not wanted:
        return {}
    gone = await users.forgotten_among(conn, set().union(*wanted.values()), since)
    return {gi: tuple(sorted(ids & gone)) for gi, ids in wanted.items() if ids & gone}


async def _recent_events(conn: AsyncConnection, ids: Sequence[int], now: dt.datetime
                         ) -> list[StoredEvent]:
    """The stored events of ``ids`` received within :data:`REDELIVER_WINDOW`."""
    if not conn.in_transaction():  # the one-trip flush committed alone: read in a new one
        async with conn.begin():
            return await _recent_events(conn, ids, now)
    ev = schema.events
    out: list[StoredEvent] = []
    for i in range(0, len(ids), _IN_CHUNK):
        for row in await conn.execute(sa.select(
                ev.c.id, ev.c.user_id, ev.c.anonymous_id, ev.c.name, ev.c.attributes,
                ev.c.created_at, ev.c.received_at).where(
                ev.c.id.in_(ids[i:i + _IN_CHUNK]),
                ev.c.received_at >= now - REDELIVER_WINDOW)):
            out.append(StoredEvent(id=int(row.id), user_id=row.user_id,
                                   anonymous_id=row.anonymous_id, name=row.name,
                                   attributes=dict(row.attributes or {}),
                                   created_at=row.created_at, received_at=row.received_at))
    return out
