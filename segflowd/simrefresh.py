"""The segment refresh schedule of a simulation, and the look before each refresh.

The daemon refreshes each segment on its interval (``refresh="15m"``): over forty
simulated days that is thousands of refreshes, nearly all of which change nothing. At
each due time the simulation therefore first asks the store, read-only, whether the
refresh would change anything (a user the segment returns who is not a member, or a
member it no longer returns); only then does the segment engine refresh for real.
The question is asked generously (it may answer yes where the real refresh then finds
nothing, never no where it would find something), so the entries and exits, and all
that follows from them, are the daemon's; what a skipped refresh would have written is
its bookkeeping (``segment_state``'s times), which no campaign reads.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import sqlalchemy as sa
import structlog

from .app import Segflow, evaluating_at
from .errors import AppError
from .schema import segment_members, users
from .segments.query import CompiledSegment, compile_segment

__all__ = ["RefreshSchedule"]

log = structlog.get_logger("segflowd.simulation")


class RefreshSchedule:
    """When each segment of ``app`` is next due, from ``start``; see the module docstring."""

    def __init__(self, app: Segflow, database: Path, start: dt.datetime) -> None:
        self.app = app
        self.next: dict[str, dt.datetime] = dict.fromkeys(app.segments, start)
        self.looked = 0  # due refreshes looked at
        self.refreshed = 0  # of them, handed to the segment engine
        self._engine = sa.create_engine(f"sqlite:///{database}", poolclass=sa.pool.StaticPool)
        self._conn: sa.Connection | None = None  # one, its read ended after each look
        self._probes: dict[str, sa.Select[tuple[bool]] | None] = {}
        for name, defn in app.segments.items():
            try:
                self._probes[name] = _probe(compile_segment(defn))
            except AppError:
                self._probes[name] = None  # broken: the engine says so when it refreshes

    def due(self, now: dt.datetime) -> list[str]:
        """The segments due at ``now``, in order of name; each is scheduled on."""
        names = sorted(n for n, t in self.next.items() if t <= now)
        for name in names:
            self.next[name] = now + dt.timedelta(seconds=self.app.segments[name].refresh)
        return names

    def next_time(self) -> dt.datetime | None:
        return min(self.next.values(), default=None)

    def would_change(self, name: str, now: dt.datetime) -> bool:
        """Whether refreshing ``name`` at ``now`` may change its membership."""
        self.looked += 1
        probe = self._probes.get(name)
        if probe is None:
            self.refreshed += 1
            return True
        if self._conn is None:
            self._conn = self._engine.connect()
        try:
            with evaluating_at(now):
                found = bool(self._conn.execute(probe).scalar())
        except sa.exc.SQLAlchemyError as exc:  # the engine's refresh records the error
            log.debug("simulation.probe_failed", segment=name, error=str(exc)[:200])
            found = True
        finally:
            self._conn.rollback()  # no snapshot kept: the next look sees every commit
        self.refreshed += found
        return found

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._engine.dispose()


def _probe(seg: CompiledSegment) -> sa.Select[tuple[bool]]:
    """Whether there is an entry or an exit, as refresh_diff would find them, less its
    ``evaluated_at`` guard (so an exit may be found that the refresh then skips); one
    statement, the segment evaluated once."""
    m, name = segment_members, seg.name
    cte = seg.query.cte("seg")
    sid = next(iter(cte.c))
    returned = sa.select(sid).select_from(cte.join(users, users.c.id == sid))
    entry = sa.exists(returned.where(~sa.exists(
        sa.select(m.c.user_id).where(m.c.segment == name, m.c.user_id == sid))))
    leaving = sa.exists(sa.select(m.c.user_id).where(m.c.segment == name,
                                                       m.c.user_id.not_in(returned)))
    return sa.select(sa.or_(entry, leaving))
