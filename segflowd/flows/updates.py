"""How the stepper writes instance state: a round's instance updates grouped by the state
they set (one UPDATE per state, each row still conditional on its own seq), the columns
stepping reads, and the signal that a conditional update lost its race."""

from __future__ import annotations

import traceback
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..schema import flow_instances

__all__ = ["GROUP_UPDATE_ROWS", "LOAD_COLUMNS", "MAX_STATES_PER_STEP", "Lost",
           "traceback_text", "update_instances"]

_fi = flow_instances.c
GROUP_UPDATE_ROWS = 200  # instance updates per statement (or per executemany)
# A round whose steps leave their instances in more distinct states than this fraction of
# its steps is written row by row (executemany): one statement per state would be no fewer.
MAX_STATES_PER_STEP = 0.25
_SET = {"seq": "n_seq", "status": "n_status", "wake_at": "n_wake", "wait_event": "n_event",
        "wait_after": "n_after", "live": "n_live", "ended_at": "n_ended", "error": "n_error",
        "updated_at": "n_updated"}


# Row by row, run as executemany: each instance conditional on its seq. live=1 leaves
# running, waiting or diverged; a diverged instance takes no step.
_GROUP_UPDATE = sa.update(flow_instances).where(
    _fi.id == sa.bindparam("b_id"), _fi.seq == sa.bindparam("b_seq"), _fi.live == 1,
    _fi.status != "diverged",
).values(**{col: sa.bindparam(key) for col, key in _SET.items()})


def _state_update(pairs: list[tuple[int, int]], state: tuple[object, ...]) -> sa.Update:
    """One UPDATE moving every instance in ``pairs`` ((id, seq it started from)) to the
    same new ``state`` (:func:`_state_of`); each row is still conditional on its own seq.
    On MariaDB an executemany of UPDATEs is one round trip per row; this is one in all.
    """
    delta, status, wake, event, after, live, ended, error, updated = state
    return sa.update(flow_instances).where(
        _fi.id.in_([i for i, _ in pairs]),  # the primary key range; the pairs filter it
        sa.tuple_(_fi.id, _fi.seq).in_(pairs), _fi.live == 1, _fi.status != "diverged",
    ).values(seq=_fi.seq + delta, status=status, wake_at=wake, wait_event=event,
             wait_after=after, live=live, ended_at=ended, error=error, updated_at=updated)


def _state_of(p: Mapping[str, object]) -> tuple[object, ...]:
    """What an update sets, but for the instance's own seq (kept as its increment)."""
    return (int(p["n_seq"]) - int(p["b_seq"]), p["n_status"],  # type: ignore[call-overload]
            p["n_wake"], p["n_event"], p["n_after"], p["n_live"], p["n_ended"], p["n_error"],
            p["n_updated"])


# What stepping reads of an instance (not its timestamps, version or error: every column
# read costs a conversion per row)
LOAD_COLUMNS = (_fi.id, _fi.campaign, _fi.user_id, _fi.status, _fi.live, _fi.seq, _fi.wake_at,
                 _fi.wait_event, _fi.entry_event_id, _fi.start_data)


def traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


class Lost(Exception):  # control flow: a conditional update matched no row
    pass


async def update_instances(conn: AsyncConnection, updates: list[dict[str, object]]) -> None:
    """Every instance update of a round, each conditional on its seq; Lost when one
    matched no row (someone moved that instance meanwhile)."""
    states: dict[tuple[object, ...], list[tuple[int, int]]] = {}
    for p in updates:
        states.setdefault(_state_of(p), []).append(
            (p["b_id"], p["b_seq"]))  # type: ignore[arg-type]  # ints
    if len(states) > max(1.0, len(updates) * MAX_STATES_PER_STEP):
        for lo in range(0, len(updates), GROUP_UPDATE_ROWS):
            part = updates[lo:lo + GROUP_UPDATE_ROWS]
            res = await conn.execute(_GROUP_UPDATE, part)
            if res.rowcount != len(part):
                raise Lost
        return
    for state, pairs in states.items():
        for lo in range(0, len(pairs), GROUP_UPDATE_ROWS):
            some = pairs[lo:lo + GROUP_UPDATE_ROWS]
            res = await conn.execute(_state_update(some, state))
            if res.rowcount != len(some):
                raise Lost
