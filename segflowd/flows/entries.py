"""Campaign entries and exits: segment membership changes start instances where a
campaign now holds and end dynamic ones that no longer do; broadcasts start flows directly.

A mixin of :class:`~segflowd.flows.service.FlowService`, which owns the state it reads.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..app import CampaignDef
from ..cursors import Cursor, load_cursor, max_change_id, save_cursor
from ..errors import FlowError
from ..hooks import MembershipChange
from ..schema import flow_instances, segment_changes, segment_members
from ..store import is_unavailable
from ..userlocks import existing_users
from .work import ACTIVE, CATCH_UP_CHANGES, MEMBERSHIP_CHUNK, Work

if TYPE_CHECKING:
    from ..kernel import Kernel

__all__ = ["CHANGES_CURSOR", "Entries", "end_live"]

log = structlog.get_logger("segflowd.flows")

CHANGES_CURSOR = "flows.changes"  # the engine_cursors row over segment_changes.id
EXIT_ATTEMPTS = 3  # reads of the live instance a dynamic exit makes while steps move it on


class Entries:
    """Applies membership changes and starts flows; see the module docstring."""

    k: Kernel
    paused: set[str]
    _held: list[MembershipChange]  # entries and exits the store refused
    # While catching up at start: (campaign, user) -> their newest instance's start,
    # and the (campaign, user) pairs with a live instance.
    _started_since: dict[tuple[str, str], dt.datetime] | None
    _live_pairs: set[tuple[str, str]]
    _ch_through: int  # every segment change up to this id was handed to flows
    _ch_frozen: int | None  # while changes are held (an outage): the cursor stops here
    _ch_saved: int  # the changes cursor as stored
    # campaign -> the time of the newest change its last resume's sweep read: an entry
    # by a change up to then that reaches the live path late (a refresh committed it
    # before the resume, handed it over after) may already have its instance
    _swept_at: dict[str, dt.datetime]

    if TYPE_CHECKING:
        def _push(self, work: Work) -> None: ...

        def _store_failed(self, exc: BaseException) -> None: ...

        def _cancel_timer(self, iid: int, wake_at: dt.datetime | None) -> None: ...

    async def _catch_up_membership(self) -> None:
        """Hand over again the segment changes after the durable cursor (``engine_cursors``
        row :data:`CHANGES_CURSOR`): the segment engine commits a change before it tells
        flows, so a crash in between left an entry without its instance. Replaying is
        safe: an entry is skipped where the campaign has an instance for the user started
        at or after it, and an exit only ends what should have ended. A store that never
        had the cursor (the first start, or one upgraded from before it) replays the
        newest :data:`CATCH_UP_CHANGES` changes, as segflowd did before the cursor."""
        sc = segment_changes.c
        async with self.k.store.connect() as conn:
            cursor = await load_cursor(conn, CHANGES_CURSOR)
            top = await max_change_id(conn)
        since = max(0, top - CATCH_UP_CHANGES) if cursor is None else cursor.last_event_id
        self._ch_through = self._ch_saved = since
        watched = {s for c in self.k.app.campaigns.values() for s in (*c.segments, *c.exclude)}
        last = since
        while watched and last < top:
            async with self.k.store.connect() as conn:
                rows = (await conn.execute(
                    sa.select(sc.id, sc.segment, sc.user_id, sc.entered, sc.at).where(
                        sc.id > last, sc.id <= top, sc.segment.in_(watched))
                    .order_by(sc.id).limit(CATCH_UP_CHANGES))).all()
            if not rows:
                break
            await self._replay_changes(rows)
            last = int(rows[-1].id)
        self._ch_through = top
        async with self.k.store.begin() as conn:
            await save_cursor(conn, CHANGES_CURSOR, Cursor(top, None), self.k.clock.now())
        self._ch_saved = top
        if top > since:
            log.info("flow.changes_caught_up", since=since, until=top)

    async def _replay_changes(self, rows: Sequence[Any]) -> None:
        fi = flow_instances.c
        since = min(r.at for r in rows)
        uids = sorted({str(r.user_id) for r in rows})
        started: dict[tuple[str, str], dt.datetime] = {}
        live: set[tuple[str, str]] = set()
        async with self.k.store.connect() as conn:
            for lo in range(0, len(uids), MEMBERSHIP_CHUNK):
                part = uids[lo:lo + MEMBERSHIP_CHUNK]
                for c, u, t in await conn.execute(
                        sa.select(fi.campaign, fi.user_id, sa.func.max(fi.created_at)).where(
                            fi.user_id.in_(part), fi.created_at >= since)
                        .group_by(fi.campaign, fi.user_id)):
                    started[(str(c), str(u))] = t
                live.update((str(c), str(u)) for c, u in await conn.execute(
                    sa.select(fi.campaign, fi.user_id).where(fi.user_id.in_(part),
                                                             fi.live == 1)))
        self._started_since, self._live_pairs = started, live
        try:
            await self._apply_membership([MembershipChange(
                str(r.segment), str(r.user_id), bool(r.entered), r.at) for r in rows])
        finally:
            self._started_since, self._live_pairs = None, set()

    async def membership_changed(self, changes: Sequence[MembershipChange]) -> None:
        """Start instances whose campaign now holds; end dynamic ones that no longer do.

        While the store is down the changes are held and applied once it is back; the
        changes cursor stays where it was until they are.
        """
        start = self._ch_through  # below these changes, whatever happens
        mine = self._ch_frozen is None
        if mine:
            self._ch_frozen = start
        # On an exception the freeze stays, until a restart replays them from the cursor.
        await self._apply_membership(changes)
        if self._held:
            # Held (an outage): frozen below them, even if a resync that finished while
            # these were applied lifted an earlier freeze.
            if self._ch_frozen is None:
                self._ch_frozen = start
        elif mine:
            self._ch_frozen = None

    def changes_through(self, change_id: int) -> None:
        """Every segment change up to ``change_id`` has been handed to flows."""
        self._ch_through = max(self._ch_through, change_id)

    def changes_applied(self) -> None:
        """Held changes were applied after an outage: the cursor may move again."""
        if not self._held:
            self._ch_frozen = None

    async def _save_changes_cursor(self) -> None:
        safe = self._ch_through if self._ch_frozen is None else self._ch_frozen
        if safe <= self._ch_saved:
            return
        async with self.k.store.begin() as conn:
            await save_cursor(conn, CHANGES_CURSOR, Cursor(safe, None), self.k.clock.now())
        self._ch_saved = safe

    async def _apply_membership(self, changes: Sequence[MembershipChange]) -> None:
        by_user: dict[str, list[MembershipChange]] = {}
        for ch in changes:
            by_user.setdefault(ch.user_id, []).append(ch)
        campaigns = list(self.k.app.campaigns.values())
        watched = {s for c in campaigns for s in (*c.segments, *c.exclude)}
        todo = [u for u, chs in by_user.items() if any(ch.segment in watched for ch in chs)]
        done: set[str] = set()
        try:
            for lo in range(0, len(todo), MEMBERSHIP_CHUNK):
                chunk = todo[lo:lo + MEMBERSHIP_CHUNK]
                mine: dict[str, set[str]] = {u: set() for u in chunk}
                async with self.k.store.connect() as conn:
                    for seg, uid in await conn.execute(
                            sa.select(segment_members.c.segment, segment_members.c.user_id)
                            .where(segment_members.c.user_id.in_(chunk),
                                   segment_members.c.segment.in_(watched))):
                        mine[str(uid)].add(str(seg))
                for user_id in chunk:
                    await self._membership(user_id, by_user[user_id], mine[user_id],
                                           campaigns)
                    done.add(user_id)
        except Exception as exc:
            if not is_unavailable(exc) or self._started_since is not None:
                raise  # (at start, as any store failure there)
            # The membership is committed; only its effect on flows is missing. Applied
            # again later, an entry already made finds its instance and does nothing.
            self._held.extend(ch for u in todo if u not in done for ch in by_user[u])
            self._store_failed(exc)

    async def _membership(self, user_id: str, chs: list[MembershipChange], mine: set[str],
                          campaigns: list[CampaignDef]) -> None:
        touched = {c.segment for c in chs}
        for c in campaigns:
            if not touched & {*c.segments, *c.exclude}:
                continue
            holds = set(c.segments) <= mine and not (set(c.exclude) & mine)
            entering = any((ch.entered and ch.segment in c.segments)
                           or (not ch.entered and ch.segment in c.exclude) for ch in chs)
            if holds and entering:
                latest = max(ch.at for ch in chs if (ch.entered and ch.segment in c.segments)
                             or (not ch.entered and ch.segment in c.exclude))
                if self._started_since is not None:  # catching up: was it entered since?
                    last_start = self._started_since.get((c.name, user_id))
                    if last_start is not None and last_start >= latest:
                        continue
                event_id = next((ch.event_id for ch in reversed(chs)
                                 if ch.event_id is not None), None)
                swept = self._swept_at.get(c.name)
                await self.enter(c, user_id, event_id, since=(
                    latest if swept is not None and latest <= swept else None))
            elif not holds and c.behavior == "dynamic" and (
                    self._started_since is None or (c.name, user_id) in self._live_pairs):
                await self.exit_user(c.name, user_id)

    async def enter(self, c: CampaignDef, user_id: str, event_id: int | None = None, *,
                    since: dt.datetime | None = None) -> int | None:
        """Start an instance of ``c`` for the user; None when it may not (or already runs).
        With ``since`` (an entry at that time a resume's sweep may have made already),
        also None where an instance of ``c`` started at or after it."""
        if c.name in self.paused:
            return None
        now = self.k.clock.now()
        fi = flow_instances.c
        try:
            async with self.k.store.begin() as conn:
                if not await existing_users(conn, [user_id]):
                    return None  # forgotten since the membership was read
                once = c.behavior == "static" and not c.reentry
                if once or since is not None:
                    q = sa.select(fi.id).where(fi.campaign == c.name, fi.user_id == user_id)
                    if not once:
                        q = q.where(fi.created_at >= since)
                    if (await conn.execute(q.limit(1))).first() is not None:
                        return None
                res = await conn.execute(sa.insert(flow_instances).values(
                    campaign=c.name, user_id=user_id, version=c.version, status="running",
                    live=1, seq=0, entry_event_id=event_id, created_at=now, updated_at=now))
                iid = int(res.inserted_primary_key[0])  # type: ignore[index]  # always set
        except IntegrityError:
            return None  # a live instance exists: the store said so
        log.info("flow.started", campaign=c.name, user_id=user_id, instance=iid)
        self.k.bus.publish("flow.started", campaign=c.name, user_id=user_id, instance=iid)
        self._push(Work(iid, "run"))
        return iid

    async def start_flow(self, campaign: str, user_id: str, *, key: str,
                         data: Mapping[str, object]) -> Literal["started", "exists", "paused"]:
        """Start ``campaign`` for the user outside segment entry (a broadcast), once per
        ``key``; ``data`` becomes ``ctx.data``. What happened:

        * ``"started"``: a new instance runs;
        * ``"exists"``: nothing to do, for good: the key was used before, the user has a
          live instance of the campaign, or the user no longer exists (forgotten);
        * ``"paused"``: nothing was done because the campaign is paused; the same call
          after ``campaign.resume`` starts it.
        """
        c = self.k.app.campaigns.get(campaign)
        if c is None:
            raise FlowError(f"no campaign {campaign!r}")
        if campaign in self.paused:
            return "paused"
        now = self.k.clock.now()
        try:
            async with self.k.store.begin() as conn:
                if not await existing_users(conn, [user_id]):
                    return "exists"  # forgotten since the broadcast read its members
                res = await conn.execute(sa.insert(flow_instances).values(
                    campaign=c.name, user_id=user_id, version=c.version, status="running",
                    live=1, seq=0, start_key=key, start_data=dict(data), created_at=now,
                    updated_at=now))
                iid = int(res.inserted_primary_key[0])  # type: ignore[index]  # always set
        except IntegrityError:
            return "exists"  # the key was used, or a live instance exists: the store said so
        log.info("flow.started", campaign=c.name, user_id=user_id, instance=iid, key=key)
        self.k.bus.publish("flow.started", campaign=c.name, user_id=user_id, instance=iid)
        self._push(Work(iid, "run"))
        return "started"

    async def exit_user(self, campaign: str, user_id: str) -> int | None:
        """End the user's live instance of ``campaign`` (dynamic exit); its id, if any."""
        async with self.k.store.begin() as conn:
            ended = await end_live(conn, campaign, user_id, self.k.clock.now())
        if ended is None:
            return None
        self.exited(campaign, user_id, *ended, reason="left segment")
        return ended[0]

    def exited(self, campaign: str, user_id: str, iid: int, wake_at: dt.datetime | None,
               *, reason: str) -> None:
        """An exit :func:`end_live` made is committed: drop its timer, log and publish it."""
        self._cancel_timer(iid, wake_at)
        log.info("flow.exited", campaign=campaign, user_id=user_id, instance=iid,
                 reason=reason)
        self.k.bus.publish("flow.exited", campaign=campaign, user_id=user_id, instance=iid,
                           reason=reason)


async def end_live(conn: AsyncConnection, campaign: str, user_id: str, now: dt.datetime
                   ) -> tuple[int, dt.datetime | None] | None:
    """End the user's live instance of ``campaign`` as ``exited`` in ``conn``'s
    transaction: its (id, wake_at), or None if there was none. The caller tells the flow
    service (:meth:`Entries.exited`) once the transaction is committed."""
    fi = flow_instances.c
    for _ in range(EXIT_ATTEMPTS):
        row = (await conn.execute(sa.select(fi.id, fi.wake_at).where(
            fi.campaign == campaign, fi.user_id == user_id, fi.live == 1,
            fi.status.in_(ACTIVE)))).first()
        if row is None:
            return None
        # Conditional: on READ COMMITTED a step may have ended it since the read; if that
        # step was continue_as_new, its successor is read next time round (each statement
        # sees what was committed before it; SQLite's write transaction is exclusive).
        done = await conn.execute(sa.update(flow_instances).where(
            fi.id == row[0], fi.live == 1, fi.status.in_(ACTIVE)).values(
            status="exited", live=None, wake_at=None, wait_event=None,
            wait_after=None, ended_at=now, updated_at=now))
        if done.rowcount == 1:
            return int(row[0]), row[1]
    return None
