"""What retention keeps whatever its age, and the guards a pass reads before it prunes.

Old is not enough: a row goes only when nothing live still reads it and deleting it
cannot let a send happen twice. The rules, each enforced by :mod:`.prune`:

1. **Ids are never reused.** The newest row of ``events``, ``segment_changes``,
   ``messages`` and ``flow_instances`` is never deleted: SQLite (and MySQL before 8.0,
   at a restart) hands out max(id) + 1, and ids are written into dedupe keys, cursors
   and signed tracking links.
2. **Cursors.** Events above the oldest durable event cursor (``engine_cursors`` rows
   ``segments``, ``transactions``, ``flows.events``) are replayed at start: kept. A
   cursor that was never saved replays nothing (its consumer starts at the newest event).
3. **Entry events.** An event that is the ``entry_event_id`` of a live instance
   (``ctx.event`` is read from it at every replay) or of a ``failed`` one (a restart
   copies it) is kept.
4. **Segment changes** above the flows' changes cursor (``flows.changes``), and the
   newest :data:`~segflowd.flows.work.CATCH_UP_CHANGES` in any case, are replayed to flows
   at start: kept, and so are those above the hold marker (``flows.held.<campaign>``)
   of a campaign the app defines: its resume lets them in (a removed campaign's marker
   holds nothing back). For the same reason an instance created at or after the oldest
   of them keeps its row: the replay skips an entry only where it finds that instance.
5. **Instances.** Only ended ones go (``completed``, ``exited``, ``terminated``,
   ``failed``; never ``running``, ``waiting`` or ``diverged``, which holds its live
   slot), by ``ended_at``, with their journal. The row itself is kept where it is the
   record that the user entered: a ``static`` campaign without ``reentry`` lets a user in
   once, by finding any instance of theirs, so there only the journal goes. The same
   holds for a campaign the app no longer defines (what it was is not known), and
   for an instance whose ``start_key`` a running broadcast may still try again.
6. **Messages.** Only finished ones go (delivery's final statuses: ``sent``, ``failed``,
   ``suppressed``, ``unknown``; never ``queued``, ``claimed`` or ``sending``), untouched
   for the whole age, with their opens and clicks. A dedupe key is what makes "never twice" hold, so
   the message goes only when its key can never be enqueued again:
   ``flow:<instance>:<seq>`` once the instance is not live (no step of it will run
   again; a message of a live instance is kept also because ``opened()`` reads it);
   ``tx:<event>:<transaction>`` once the event is at or below the ``transactions``
   cursor (it is never processed again); ``bc:<broadcast>:<user>`` once the broadcast
   is not running; no key at all (test sends) and ``send:<key>`` (the send routes: an
   ``Idempotency-Key`` holds for the retention age) at once; any other key never.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..app import Segflow
from ..cursors import max_change_id, max_event_id
from ..delivery.outbox import SEND_KEY_PREFIX
from ..flows.entries import CHANGES_CURSOR
from ..flows.goals import CURSOR_NAME as GOALS_CURSOR
from ..flows.held import marker_name
from ..flows.wakes import CURSOR_NAME as FLOW_EVENTS_CURSOR
from ..flows.work import CATCH_UP_CHANGES
from ..schema import (
    broadcasts,
    campaign_versions,
    engine_cursors,
    flow_instances,
    messages,
    segment_changes,
)
from ..segments.engine import CURSOR_NAME as SEGMENTS_CURSOR
from ..segments.transactions import CURSOR_NAME as TRANSACTIONS_CURSOR

__all__ = ["ENDED", "EVENT_CURSORS", "RESTARTABLE", "Guards", "flow_instance_of",
           "load_guards", "message_key_may_go", "start_key_may_go"]

ENDED = ("completed", "exited", "terminated", "failed")  # the statuses an instance ends in
RESTARTABLE = "failed"  # instance.restart starts these over, with their entry event
EVENT_CURSORS = (SEGMENTS_CURSOR, TRANSACTIONS_CURSOR, FLOW_EVENTS_CURSOR)


@dataclasses.dataclass(frozen=True)
class Guards:
    """What a pass must keep, read once at its start from small tables and index seeks.

    Read at the start is safe for the whole pass: cursors only move forward, a
    broadcast that stops running stays stopped, and what is made meanwhile is young.
    """

    top_event: int  # the newest id of each table (rule 1)
    top_change: int
    top_instance: int
    top_message: int
    event_floor: int  # events above it are replayed at start (rule 2)
    change_floor: int  # segment changes above it are replayed to flows (rule 4)
    entry_horizon: dt.datetime | None  # the oldest of those changes (rule 4)
    transactions_cursor: int | None  # None: never saved, so nothing is replayed (rule 6)
    running_broadcasts: frozenset[int]
    campaigns: tuple[str, ...]  # every campaign that may have instances
    rows_go: frozenset[str]  # campaigns whose ended instances lose their row (rule 5)

    @property
    def event_bound(self) -> int:
        """Events with an id up to here may go."""
        return min(self.top_event - 1, self.event_floor)

    @property
    def change_bound(self) -> int:
        """Segment changes with an id up to here may go."""
        return min(self.top_change - 1, self.change_floor)


async def load_guards(conn: AsyncConnection, app: Segflow) -> Guards:
    ec, sc = engine_cursors.c, segment_changes.c
    top_event = await max_event_id(conn)
    top_change = await max_change_id(conn)
    top_instance = int((await conn.execute(
        sa.select(sa.func.max(flow_instances.c.id)))).scalar() or 0)
    top_message = int((await conn.execute(sa.select(sa.func.max(messages.c.id)))).scalar() or 0)
    held = [marker_name(c) for c in app.campaigns]
    # The goal engine's cursor holds events only while the app has a goal: one left
    # behind by an app that dropped its goals must not hold pruning forever.
    consumers = [*EVENT_CURSORS, *([GOALS_CURSOR] if any(
        c.goal is not None for c in app.campaigns.values()) else [])]
    cursors = {str(n): int(v) for n, v in await conn.execute(
        sa.select(ec.name, ec.last_event_id).where(
            ec.name.in_([*consumers, CHANGES_CURSOR, *held])))}
    saved = [cursors[n] for n in consumers if n in cursors]
    window = top_change - CATCH_UP_CHANGES
    change_floor = min(cursors.get(CHANGES_CURSOR, window), window,
                       *(cursors[n] for n in held if n in cursors))
    horizon = (await conn.execute(
        sa.select(sa.func.min(sc.at)).where(sc.id > change_floor))).scalar()
    running = frozenset(int(i) for (i,) in await conn.execute(
        sa.select(broadcasts.c.id).where(broadcasts.c.status == "running")))
    versioned = {str(c) for (c,) in await conn.execute(
        sa.select(campaign_versions.c.campaign).distinct())}
    return Guards(
        top_event=top_event, top_change=top_change, top_instance=top_instance,
        top_message=top_message, event_floor=min(saved, default=top_event),
        change_floor=change_floor, entry_horizon=horizon,
        transactions_cursor=cursors.get(TRANSACTIONS_CURSOR), running_broadcasts=running,
        campaigns=tuple(sorted(versioned | set(app.campaigns))),
        rows_go=frozenset(c.name for c in app.campaigns.values()
                          if c.behavior == "dynamic" or c.reentry))


def _key_id(key: str, prefix: str) -> int | None:
    """The number after ``prefix:`` in a key like ``prefix:<n>:...``, else None."""
    head, _, rest = key.partition(":")
    number, sep, _ = rest.partition(":")
    return int(number) if head == prefix and sep and number.isdigit() else None


def flow_instance_of(key: str | None) -> int | None:
    """The instance a flow step's dedupe key (``flow:<instance>:<seq>``) belongs to."""
    return None if key is None else _key_id(key, "flow")


def message_key_may_go(key: str | None, g: Guards) -> bool:
    """Rule 6 short of the instance's liveness (the caller asks the store about that)."""
    if key is None or key.startswith(SEND_KEY_PREFIX) or flow_instance_of(key) is not None:
        return True
    event = _key_id(key, "tx")
    if event is not None:
        return g.transactions_cursor is None or event <= g.transactions_cursor
    broadcast = _key_id(key, "bc")
    return broadcast is not None and broadcast not in g.running_broadcasts


def start_key_may_go(key: str | None, g: Guards) -> bool:
    """An instance started with ``key`` may lose its row: no running broadcast may start
    it again (a broadcast's starts are keyed ``bc:<broadcast>:<user>``)."""
    if key is None:
        return True
    broadcast = _key_id(key, "bc")
    return broadcast is not None and broadcast not in g.running_broadcasts
