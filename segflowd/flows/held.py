"""Entries held by a paused campaign, and let in when it resumes.

A paused campaign starts no instances, but its segments go on changing. With
``on_pause="hold"`` (the default) the users who would have entered meanwhile enter when
it resumes; with ``on_pause="skip"`` they never do (segflowd's behaviour before holds).

The store is the record, so a crash loses nothing and doubles nothing:

* pausing writes a **hold marker**, the ``engine_cursors`` row ``flows.held.<campaign>``,
  whose ``last_event_id`` is the segment change id below which every change had already
  been handed to flows (so had entered, or not, while the campaign ran). Pausing a campaign
  that still has a marker (paused again before a resume finished) keeps the older one.
  Retention keeps the changes above it (:mod:`segflowd.retention.rules`, rule 4);
* resuming clears the paused flag first and then **sweeps** the changes above the marker:
  a user enters when a change after it is an entry into one of the campaign's segments or
  an exit from one of its exclusions, *and* the user is now in every segment and in no
  exclusion, *and* the campaign's entry rules allow it: a static campaign without
  ``reentry`` only for a user with no instance of it at all; otherwise only for a user
  with no live instance and none started at or after that change. Only then is the
  marker deleted (and only if the campaign was not paused again meanwhile);
* at start, a campaign that is not paused but still has a marker had its resume cut
  short: the sweep runs again.

A change the sweep read may reach the live path only afterwards (a refresh commits its
changes before it hands them to flows): up to the newest change the sweep read, the
live path enters only a user with no instance started at or after the change, as the
sweep does (so too for changes an outage kept from it, applied by the resync). A sweep
that an outage cuts short is run again by the resync once the store is back, as
at start.

The sweep is idempotent: an entry it made has an instance started after the change
that caused it, so running it again (after a kill -9, or twice) skips that user; an
entry made meanwhile by the live path (a segment refresh racing the resume) is skipped the
same way, and the store's one-live-instance constraint settles the rest. A campaign
paused again mid-sweep stops it; the marker stays for the next resume.

The number of entries waiting (``waiting_entries``) is the same computation, counted.

A mixin of :class:`~segflowd.flows.service.FlowService`, which owns the state it reads.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..app import CampaignDef, Segflow
from ..cursors import Cursor, load_cursor, max_change_id, save_cursor
from ..schema import (
    campaign_settings,
    engine_cursors,
    flow_instances,
    segment_changes,
    segment_members,
)
from ..store import Store
from ..userlocks import existing_users
from .work import CATCH_UP_CHANGES, MEMBERSHIP_CHUNK, Work

if TYPE_CHECKING:
    from ..kernel import Kernel

__all__ = ["HELD_PREFIX", "Held", "held_candidates", "marker_name", "waiting_entries"]

log = structlog.get_logger("segflowd.flows")

HELD_PREFIX = "flows.held."  # + campaign: the hold marker's engine_cursors row


def marker_name(campaign: str) -> str:
    return HELD_PREFIX + campaign  # campaign names are at most 128 characters


async def held_candidates(conn: AsyncConnection, c: CampaignDef, after: int, top: int
                          ) -> list[list[tuple[str, dt.datetime]]]:
    """The users who would have entered ``c`` by the changes in ``(after, top]``, with
    the time of their last such change, a page per read of changes; see the module
    docstring for the rules."""
    sc = segment_changes.c
    entering = sa.or_(sa.and_(sc.segment.in_(c.segments), sc.entered.is_(True)),
                      sa.and_(sc.segment.in_(c.exclude), sc.entered.is_(False)))
    pages: list[list[tuple[str, dt.datetime]]] = []
    last = after
    while last < top:
        rows = (await conn.execute(
            sa.select(sc.id, sc.user_id, sc.at).where(sc.id > last, sc.id <= top, entering)
            .order_by(sc.id).limit(CATCH_UP_CHANGES))).all()
        if not rows:
            break
        latest: dict[str, dt.datetime] = {}
        for r in rows:
            latest[str(r.user_id)] = max(r.at, latest.get(str(r.user_id), r.at))
        users = sorted(latest)
        found: list[tuple[str, dt.datetime]] = []
        for lo in range(0, len(users), MEMBERSHIP_CHUNK):
            found += await _admissible(conn, c, users[lo:lo + MEMBERSHIP_CHUNK], latest)
        last = int(rows[-1].id)
        pages.append(found)
    return pages


async def _admissible(conn: AsyncConnection, c: CampaignDef, users: Sequence[str],
                      latest: dict[str, dt.datetime]) -> list[tuple[str, dt.datetime]]:
    sm, fi = segment_members.c, flow_instances.c
    mine: dict[str, set[str]] = {u: set() for u in users}
    for seg, uid in await conn.execute(sa.select(sm.segment, sm.user_id).where(
            sm.user_id.in_(users), sm.segment.in_((*c.segments, *c.exclude)))):
        mine[str(uid)].add(str(seg))
    holding = [u for u in users
               if set(c.segments) <= mine[u] and not set(c.exclude) & mine[u]]
    if not holding:
        return []
    started: dict[str, tuple[dt.datetime, bool]] = {}
    for uid, newest, live in await conn.execute(
            sa.select(fi.user_id, sa.func.max(fi.created_at), sa.func.max(fi.live))
            .where(fi.campaign == c.name, fi.user_id.in_(holding)).group_by(fi.user_id)):
        started[str(uid)] = (newest, live is not None)
    once = c.behavior == "static" and not c.reentry
    return [(u, latest[u]) for u in holding if u not in started or not (
        once or started[u][1] or started[u][0] >= latest[u])]


async def waiting_entries(store: Store, app: Segflow) -> dict[str, int]:
    """Per paused campaign with a hold marker: how many users would enter on resume."""
    ec = engine_cursors.c
    async with store.connect() as conn:
        paused = {str(r[0]) for r in await conn.execute(
            sa.select(campaign_settings.c.campaign)
            .where(campaign_settings.c.paused.is_(True)))}
        marks = {str(n)[len(HELD_PREFIX):]: int(v) for n, v in await conn.execute(
            sa.select(ec.name, ec.last_event_id).where(ec.name.like(HELD_PREFIX + "%")))}
        top = await max_change_id(conn)
        out: dict[str, int] = {}
        for name in sorted(paused):
            c = app.campaigns.get(name)
            if c is None or c.on_pause != "hold" or name not in marks:
                continue
            users: set[str] = set()
            for page in await held_candidates(conn, c, marks[name], top):
                users.update(u for u, _ in page)
            out[name] = len(users)
    return out


class Held:
    """Hold markers and the resume sweep; see the module docstring."""

    k: Kernel
    paused: set[str]
    _ch_through: int
    _ch_frozen: int | None
    _waiting: dict[str, int]
    _swept_at: dict[str, dt.datetime]  # campaign -> its sweep's newest change (entries.py)

    if TYPE_CHECKING:
        def _push(self, work: Work) -> None: ...

    async def _mark_held(self, conn: AsyncConnection, c: CampaignDef) -> None:
        """In the pause's transaction: the hold marker, unless one is there already."""
        if c.on_pause != "hold" or await load_cursor(conn, marker_name(c.name)) is not None:
            return
        below = self._ch_through if self._ch_frozen is None else min(
            self._ch_through, self._ch_frozen)
        await save_cursor(conn, marker_name(c.name), Cursor(below, None), self.k.clock.now())

    async def _release_held(self, c: CampaignDef) -> int:
        """Enter whoever the campaign held (its paused flag is already cleared); how many
        entered. The marker goes once all did, unless the campaign was paused again."""
        async with self.k.store.connect() as conn:
            mark = await load_cursor(conn, marker_name(c.name))
            top = await max_change_id(conn)
            top_at = (await conn.execute(sa.select(segment_changes.c.at).where(
                segment_changes.c.id == top))).scalar()
            pages = [] if mark is None or c.on_pause != "hold" else await held_candidates(
                conn, c, mark.last_event_id, top)
        if mark is not None and top_at is not None:  # before any entry: see entries.py
            self._swept_at[c.name] = max(top_at, self._swept_at.get(c.name, top_at))
        entered = 0
        for page in pages:
            for user_id, since in page:
                if c.name in self.paused:
                    log.info("campaign.held_release_stopped", campaign=c.name,
                             entered=entered)
                    return entered
                entered += await self._enter_held(c, user_id, since)
        async with self.k.store.begin() as conn:
            still = (await conn.execute(sa.select(campaign_settings.c.paused).where(
                campaign_settings.c.campaign == c.name))).scalar()
            if not still and c.name not in self.paused:
                await conn.execute(sa.delete(engine_cursors).where(
                    engine_cursors.c.name == marker_name(c.name)))
        self._waiting.pop(c.name, None)
        if mark is not None:
            log.info("campaign.held_released", campaign=c.name, entered=entered,
                     since_change=mark.last_event_id, until_change=top)
        return entered

    async def _enter_held(self, c: CampaignDef, user_id: str, since: dt.datetime) -> int:
        """Start ``c`` for a held user, checking again, in the transaction, that no
        instance (static, no reentry) or none started at or after ``since`` exists: the
        live path may have entered the user since the sweep read."""
        now = self.k.clock.now()
        fi = flow_instances.c
        try:
            async with self.k.store.begin() as conn:
                if not await existing_users(conn, [user_id]):
                    return 0  # forgotten since its membership was read
                q = sa.select(fi.id).where(fi.campaign == c.name, fi.user_id == user_id)
                if c.behavior != "static" or c.reentry:
                    q = q.where(fi.created_at >= since)
                if (await conn.execute(q.limit(1))).first() is not None:
                    return 0
                res = await conn.execute(sa.insert(flow_instances).values(
                    campaign=c.name, user_id=user_id, version=c.version, status="running",
                    live=1, seq=0, created_at=now, updated_at=now))
                iid = int(res.inserted_primary_key[0])  # type: ignore[index]  # always set
        except IntegrityError:
            return 0  # a live instance exists: the store said so
        log.info("flow.started", campaign=c.name, user_id=user_id, instance=iid, held=True)
        self.k.bus.publish("flow.started", campaign=c.name, user_id=user_id, instance=iid)
        self._push(Work(iid, "run"))
        return 1

    async def _finish_releases(self) -> None:
        """At start: sweep again for every resume a crash cut short."""
        ec = engine_cursors.c
        async with self.k.store.connect() as conn:
            names = [str(n)[len(HELD_PREFIX):] for (n,) in await conn.execute(
                sa.select(ec.name).where(ec.name.like(HELD_PREFIX + "%")))]
        for name in names:
            c = self.k.app.campaigns.get(name)
            if c is not None and name not in self.paused:
                await self._release_held(c)

    async def _count_waiting(self) -> None:
        self._waiting = await waiting_entries(self.k.store, self.k.app) if self.paused else {}
