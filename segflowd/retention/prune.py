"""The table walks of a retention pass: each table in id order, a batch at a time.

Every walk reads at most ``batch_size`` rows by primary key (or, for instances, by the
``(campaign, status)`` index, whose entries end in the id), decides in Python which of
them may go (:mod:`.rules`), and deletes those by id in one short transaction, re-checking
in it what could have changed since the read. Then it pauses, so ingest and flows get
the store between batches. Ids follow insertion time, so a walk stops at the first row
too young to go: nothing after it can be older.

Instances are walked per ``(campaign, status)``; the rows a walk has settled for good (deleted,
or kept as the record of an entry with their journal gone) are skipped by later passes,
until every walk starts over once per :data:`RESCAN` to find instances that ended since.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import sqlalchemy as sa

from ..config import RetentionConfig
from ..delivery.service import FINAL
from ..schema import (
    engagement,
    events,
    flow_instances,
    flow_journal,
    forgotten,
    message_events,
    messages,
    segment_changes,
)
from ..store import Store
from .rules import (
    ENDED,
    RESTARTABLE,
    Guards,
    flow_instance_of,
    message_key_may_go,
    start_key_may_go,
)

__all__ = ["KINDS", "RESCAN", "Pruner"]

RESCAN = dt.timedelta(days=1)  # how often instance walks start again from the oldest row
# What a pass counts, in the order it prunes: instances go first, so that the entry
# events and the messages they held are free when their walks come.
KINDS = ("instances", "journal_rows", "messages", "engagement", "segment_changes", "events",
         "tombstones")


class Pruner:
    """Walks the tables for a pass; keeps where instance walks may resume between passes."""

    def __init__(self, store: Store, cfg: RetentionConfig, *, pause: float,
                 count: Callable[[str, int], None]) -> None:
        self.store = store
        self.cfg = cfg
        self.pause = pause
        self.count = count  # told (kind, rows) after each batch commits
        self.stopping = False  # set by the daemon's drain: no batch begins after it
        self._resume: dict[tuple[str, str], int] = {}  # (campaign, status) -> settled id
        self._rescanned: dt.datetime | None = None

    async def run(self, g: Guards, now: dt.datetime) -> None:
        """One pass over every kind that is not kept forever."""
        if self._rescanned is None or now - self._rescanned >= RESCAN:
            self._resume.clear()
            self._rescanned = now
        cfg = self.cfg
        if cfg.finished_instances is not None:
            await self.instances(now - dt.timedelta(seconds=cfg.finished_instances), g)
        if cfg.messages is not None:
            await self.messages(now - dt.timedelta(seconds=cfg.messages), g)
        if cfg.segment_changes is not None:
            await self.segment_changes(now - dt.timedelta(seconds=cfg.segment_changes), g)
        if cfg.events is not None:
            await self.events(now - dt.timedelta(seconds=cfg.events), g)
        if cfg.forget_window is not None:
            await self.tombstones(now - dt.timedelta(seconds=cfg.forget_window))

    async def _breathe(self) -> None:
        # Real time, not the kernel's clock: the pause is for the store, and a fake
        # clock must not hold a pass until a test moves it.
        if self.pause > 0:
            await anyio.sleep(self.pause)
        else:
            await anyio.lowlevel.checkpoint()

    async def _read(self, query: sa.Select[Any]) -> Sequence[sa.Row[Any]]:
        async with self.store.connect() as conn:
            return list((await conn.execute(query.limit(self.cfg.batch_size))).all())

    # -- flow instances and their journal (rule 5) -----------------------------------

    async def instances(self, cutoff: dt.datetime, g: Guards) -> None:
        fi = flow_instances.c
        for campaign in g.campaigns:
            for status in ENDED:
                walk = (campaign, status)
                after = self._resume.get(walk, 0)
                settled = True  # every row of this walk so far is done with for good
                while not self.stopping:
                    rows = await self._read(
                        sa.select(fi.id, fi.seq, fi.created_at, fi.ended_at, fi.start_key)
                        .where(fi.campaign == campaign, fi.status == status, fi.id > after,
                               fi.id < g.top_instance).order_by(fi.id))
                    drop: list[int] = []  # rows that go, journal and all
                    strip: list[tuple[int, int]] = []  # (id, seq): every row whose journal goes
                    young = False
                    for r in rows:
                        if r.created_at >= cutoff:  # it ended after it began: too young
                            young = True
                            break
                        after = int(r.id)
                        if r.ended_at is None or r.ended_at >= cutoff:
                            settled = False
                            continue
                        strip.append((int(r.id), int(r.seq)))
                        # Elsewhere the row is the record of an entry and stays for good.
                        if campaign in g.rows_go:
                            if ((g.entry_horizon is None or r.created_at < g.entry_horizon)
                                    and start_key_may_go(r.start_key, g)):
                                drop.append(int(r.id))
                            else:
                                settled = False  # its row may go in a later pass
                    dropped = set(drop)
                    await self._drop_instances(await self._with_journal(strip, dropped),
                                               dropped, cutoff)
                    if settled:
                        self._resume[walk] = after
                    if young or len(rows) < self.cfg.batch_size:
                        break
                    await self._breathe()

    async def _with_journal(self, strip: list[tuple[int, int]], drop: set[int]
                            ) -> list[tuple[int, int]]:
        """``strip`` less the kept rows whose journal is gone already (a rescan meets
        every kept entry record again): one look-up by the journal's key."""
        keep = [iid for iid, _ in strip if iid not in drop]
        if not keep:
            return strip
        async with self.store.connect() as conn:
            journaled = {int(i) for (i,) in await conn.execute(
                sa.select(flow_journal.c.instance_id).distinct().where(
                    flow_journal.c.instance_id.in_(keep)))}
        return [(iid, seq) for iid, seq in strip if iid in journaled or iid in drop]

    async def _drop_instances(self, strip: list[tuple[int, int]], drop: set[int],
                              cutoff: dt.datetime) -> None:
        """Delete the journal of ``strip`` and the rows of ``drop``, at most about
        ``batch_size`` journal rows per statement (an instance's seq is its journal's
        length)."""
        group: list[int] = []
        size = 0
        for iid, seq in strip:
            if seq > self.cfg.batch_size:  # a long journal goes in slices of its own
                for lo in range(0, seq, self.cfg.batch_size):
                    await self._delete_journal_slice(iid, lo, lo + self.cfg.batch_size,
                                                     cutoff)
                seq = 0
            if group and size + seq > self.cfg.batch_size:
                await self._delete_instances(group, drop, cutoff)
                group, size = [], 0
            group.append(iid)
            size += max(1, seq)
        if group:
            await self._delete_instances(group, drop, cutoff)

    async def _delete_journal_slice(self, iid: int, lo: int, hi: int,
                                    cutoff: dt.datetime) -> None:
        fi, fj = flow_instances.c, flow_journal.c
        async with self.store.begin() as conn:
            ended = (await conn.execute(sa.select(fi.id).where(
                fi.id == iid, fi.live.is_(None), fi.ended_at < cutoff))).first()
            if ended is None:
                return
            done = await conn.execute(sa.delete(flow_journal).where(
                fj.instance_id == iid, fj.seq >= lo, fj.seq < hi))
        self.count("journal_rows", max(0, done.rowcount))
        await self._breathe()

    async def _delete_instances(self, ids: list[int], drop: set[int],
                                cutoff: dt.datetime) -> None:
        fi = flow_instances.c
        async with self.store.begin() as conn:
            # Ended is final, but a row may be gone, or (were a bug to revive it) live:
            # only what still reads ended and old, locked, is touched.
            ended = [int(i) for (i,) in await conn.execute(
                sa.select(fi.id).where(fi.id.in_(ids), fi.live.is_(None),
                                       fi.ended_at < cutoff).with_for_update())]
            if not ended:
                return
            journal = await conn.execute(sa.delete(flow_journal).where(
                flow_journal.c.instance_id.in_(ended)))
            gone = [i for i in ended if i in drop]
            rows = await conn.execute(sa.delete(flow_instances).where(
                fi.id.in_(gone))) if gone else None
        self.count("journal_rows", max(0, journal.rowcount))
        if rows is not None:
            self.count("instances", max(0, rows.rowcount))
        await self._breathe()

    # -- messages and their engagement (rule 6) ---------------------------------------

    async def messages(self, cutoff: dt.datetime, g: Guards) -> None:
        m, fi = messages.c, flow_instances.c
        after = 0
        while not self.stopping:
            rows = await self._read(
                sa.select(m.id, m.status, m.dedupe_key, m.instance_id, m.created_at,
                          m.updated_at)
                .where(m.id > after, m.id < g.top_message).order_by(m.id))
            young = False
            maybe: list[tuple[int, int | None]] = []  # (message, its flow instance)
            for r in rows:
                if r.created_at >= cutoff:
                    young = True
                    break
                after = int(r.id)
                if (r.status in FINAL and r.updated_at < cutoff
                        and message_key_may_go(r.dedupe_key, g)):
                    iid = flow_instance_of(r.dedupe_key)
                    maybe.append((int(r.id), iid if iid is not None else r.instance_id))
            instances = {i for _, i in maybe if i is not None}
            if instances:
                async with self.store.connect() as conn:
                    live = {int(i) for (i,) in await conn.execute(sa.select(fi.id).where(
                        fi.id.in_(sorted(instances)), fi.live == 1))}
                maybe = [(mid, i) for mid, i in maybe if i not in live]
            if maybe:
                await self._delete_messages([mid for mid, _ in maybe], cutoff)
            if young or len(rows) < self.cfg.batch_size:
                break
            await self._breathe()

    async def _delete_messages(self, ids: list[int], cutoff: dt.datetime) -> None:
        m = messages.c
        async with self.store.begin() as conn:
            # message.retry may have queued one again since the read
            final = [int(i) for (i,) in await conn.execute(sa.select(m.id).where(
                m.id.in_(ids), m.status.in_(sorted(FINAL)), m.updated_at < cutoff
            ).with_for_update())]
            if not final:
                return
            opened = await conn.execute(sa.delete(engagement).where(
                engagement.c.message_id.in_(final)))
            await conn.execute(sa.delete(message_events).where(
                message_events.c.message_id.in_(final)))
            gone = await conn.execute(sa.delete(messages).where(m.id.in_(final)))
        self.count("engagement", max(0, opened.rowcount))
        self.count("messages", max(0, gone.rowcount))

    # -- segment changes (rule 4) and events (rules 2 and 3) ---------------------------

    async def segment_changes(self, cutoff: dt.datetime, g: Guards) -> None:
        sc = segment_changes.c
        after = 0
        while not self.stopping:
            rows = await self._read(sa.select(sc.id, sc.at).where(
                sc.id > after, sc.id <= g.change_bound).order_by(sc.id))
            old: list[int] = []
            for r in rows:
                if r.at >= cutoff:
                    break
                old.append(int(r.id))
            if old:
                after = old[-1]
                async with self.store.begin() as conn:
                    gone = await conn.execute(sa.delete(segment_changes).where(
                        sc.id.in_(old)))
                self.count("segment_changes", max(0, gone.rowcount))
            if len(old) < len(rows) or len(rows) < self.cfg.batch_size:
                break
            await self._breathe()

    async def events(self, cutoff: dt.datetime, g: Guards) -> None:
        ev, fi = events.c, flow_instances.c
        after = 0
        while not self.stopping:
            rows = await self._read(sa.select(ev.id, ev.user_id, ev.received_at).where(
                ev.id > after, ev.id <= g.event_bound).order_by(ev.id))
            young = False
            old: list[tuple[int, str | None]] = []
            for r in rows:
                if r.received_at >= cutoff:
                    young = True
                    break
                old.append((int(r.id), r.user_id))
            if old:
                after = old[-1][0]
                ids = [i for i, _ in old]
                users = sorted({u for _, u in old if u is not None})
                held: set[int] = set()
                async with self.store.begin() as conn:
                    if users:  # an entry event is its user's: the user index finds it
                        held = {int(i) for (i,) in await conn.execute(
                            sa.select(fi.entry_event_id).where(
                                fi.user_id.in_(users), fi.entry_event_id.in_(ids),
                                sa.or_(fi.live == 1, fi.status == RESTARTABLE)))}
                    free = [i for i in ids if i not in held]
                    gone = await conn.execute(sa.delete(events).where(
                        ev.id.in_(free))) if free else None
                if gone is not None:
                    self.count("events", max(0, gone.rowcount))
            if young or len(rows) < self.cfg.batch_size:
                break
            await self._breathe()

    async def tombstones(self, cutoff: dt.datetime) -> None:
        """Tombstones of forgets older than ``forget_window``: ingest ignores them already,
        and a hash of a guessable id says it was forgotten to whoever reads the store."""
        fg = forgotten.c
        while not self.stopping:
            rows = await self._read(sa.select(fg.id_hash).where(fg.forgotten_at < cutoff)
                                    .order_by(fg.id_hash))
            if rows:
                async with self.store.begin() as conn:
                    gone = await conn.execute(sa.delete(forgotten).where(
                        fg.id_hash.in_([r.id_hash for r in rows]), fg.forgotten_at < cutoff))
                self.count("tombstones", max(0, gone.rowcount))
            if len(rows) < self.cfg.batch_size:
                break
            await self._breathe()
