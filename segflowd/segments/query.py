"""Segment queries: turning a definition into one portable SELECT of user ids.

The real-time and scheduled engines (:mod:`segflowd.segments.engine`) build on
:func:`compile_segment`: the segment's SELECT, the tables it reads (so ingest only
re-evaluates segments that can change), and the same SELECT narrowed to a batch of user
ids. :func:`probe_segment` also serves ``segflowd check``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select, visitors
from sqlalchemy.sql.elements import ColumnElement, Label

from ..app import Ago, SegmentDef, evaluating_at
from ..errors import AppError
from ..hooks import MembershipChange
from ..schema import segment_changes, segment_members, segment_state, users
from ..store import Store
from ..userlocks import existing_users

__all__ = ["CHANGES_CHUNK", "CompiledSegment", "apply_batch", "compile_segment", "db_message",
           "member_count", "membership_diff", "probe_segment", "refresh_diff", "save_state",
           "segment_select", "sweep_orphans"]

CHANGES_CHUNK = 5000  # membership changes read or deleted per statement


def segment_select(defn: SegmentDef) -> Select[tuple[str]]:
    """The segment as ``SELECT id`` (Core or raw SQL).

    Every :class:`Ago` in it binds at execution time: execute the query inside
    :func:`~segflowd.app.evaluating_at` to evaluate it at a given (injected) time.
    """
    if defn.sql is not None:
        _check_params(defn)
        binds = [
            sa.bindparam(k, callable_=v.resolve, type_=sa.DateTime()) if isinstance(v, Ago)
            else sa.bindparam(k, v, type_=sa.DateTime() if isinstance(v, dt.datetime) else None)
            for k, v in defn.params.items()
        ]
        raw = sa.text(defn.sql).bindparams(*binds).columns(sa.column("id"))
        sub = raw.subquery("segment")
        return sa.select(sub.c.id)
    assert defn.query is not None
    try:
        query = defn.query()
    except Exception as exc:
        raise AppError(f"{defn.origin}: segment {defn.name!r}: the function raised "
                       f"{type(exc).__name__}: {exc}") from None
    if not isinstance(query, Select):
        raise AppError(f"{defn.origin}: segment {defn.name!r} must return a SQLAlchemy "
                       f"select of user ids, not {type(query).__name__}")
    if len(query.selected_columns) != 1:
        raise AppError(f"{defn.origin}: segment {defn.name!r} must select exactly one column "
                       f"(the user id), not {len(query.selected_columns)}")
    return query


def _check_params(defn: SegmentDef) -> None:
    """AppError unless ``params=`` supplies exactly the SQL's ``:name`` binds."""
    assert defn.sql is not None
    used = set(sa.text(defn.sql).compile().params)
    missing = sorted(used - set(defn.params))
    unused = sorted(set(defn.params) - used)
    if not missing and not unused:
        return
    said = [f"the SQL uses {', '.join(f':{n}' for n in missing)}, which params= does not "
            "give" if missing else "",
            f"params= gives {', '.join(repr(n) for n in unused)}, which the SQL never uses"
            if unused else ""]
    raise AppError(f"{defn.origin}: segment {defn.name!r}: "
                   f"{'; '.join(s for s in said if s)}")


async def probe_segment(store: Store, defn: SegmentDef, now: dt.datetime) -> None:
    """Compile and run the segment with ``LIMIT 0``; AppError with the database's message."""
    query = segment_select(defn)
    try:
        with evaluating_at(now):
            async with store.connect() as conn:
                await conn.execute(query.limit(0))
    except Exception as exc:
        raise AppError(f"{defn.origin}: segment {defn.name!r} fails on the store: "
                       f"{db_message(exc)}") from None


def db_message(exc: BaseException) -> str:
    """The database's own message for ``exc``, without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).split("\n", 1)[0][:500]


@dataclasses.dataclass(frozen=True)
class CompiledSegment:
    """A segment ready to evaluate: its SELECT and the store tables it reads.

    ``tables`` is None for raw SQL, whose tables cannot be told from the text: such a
    segment is treated as reading everything.
    """

    defn: SegmentDef
    query: Select[tuple[str]]
    tables: frozenset[str] | None

    @property
    def name(self) -> str:
        return self.defn.name

    def reads_any(self, tables: frozenset[str]) -> bool:
        """Whether a change to any of ``tables`` can change this segment's membership."""
        return self.tables is None or bool(self.tables & tables)

    def among(self, user_ids: Sequence[str]) -> Select[tuple[str]]:
        """The segment's members among ``user_ids`` (one query for the whole batch).

        A Core select of a plain column is narrowed in its own WHERE (before any GROUP
        BY, so the database reads only those users' rows); anything else is wrapped as
        a subquery filtered to the ids.
        """
        column = _plain_column(self.query)
        if column is not None:
            return self.query.where(column.in_(list(user_ids)))
        sub = self.query.subquery("segment")
        sid = next(iter(sub.c))
        return sa.select(sid).where(sid.in_(list(user_ids)))


def compile_segment(defn: SegmentDef) -> CompiledSegment:
    """Build the segment's SELECT once; AppError if the definition is not a usable one."""
    query = segment_select(defn)
    tables: frozenset[str] | None = None
    if defn.sql is None:
        tables = frozenset(
            el.name for el in visitors.iterate(query) if isinstance(el, sa.Table))
    return CompiledSegment(defn=defn, query=query, tables=tables)


def _plain_column(query: Select[tuple[str]]) -> ColumnElement[str] | None:
    """The selected column when narrowing the query's own WHERE keeps its meaning."""
    if getattr(query, "_limit_clause", None) is not None:
        return None
    if getattr(query, "_offset_clause", None) is not None:
        return None
    col: object = next(iter(query.selected_columns))
    if isinstance(col, Label):
        col = col.element
    if isinstance(col, sa.Column) and isinstance(col.table, sa.Table):
        return col
    return None


# -- applying results (the segment engine's SQL) ----------------------------------------


async def apply_batch(conn: AsyncConnection, seg: CompiledSegment, user_ids: Sequence[str],
                       now: dt.datetime,
                       causes: Mapping[str, int] | None) -> list[MembershipChange]:
    """Evaluate ``seg`` for ``user_ids`` at ``now`` and apply the difference (one transaction).

    No lock is taken on the users (ingest never waits for an evaluation): a user whose
    forget commits while this runs may still be admitted (MySQL), and the engine sweeps
    that row after this round (:func:`sweep_orphans`).
    """
    m = segment_members
    entered: list[str] = []
    exited: list[str] = []
    diff = await conn.execute(membership_diff(seg, user_ids, now))
    for row in diff.all():
        (entered if row[1] == _ENTER else exited).append(str(row[0]))
    entered.sort()
    exited.sort()
    if entered:
        await conn.execute(sa.insert(m), [
            {"segment": seg.name, "user_id": u, "entered_at": now, "evaluated_at": now}
            for u in entered])
    if exited:
        await conn.execute(sa.delete(m).where(m.c.segment == seg.name,
                                              m.c.user_id.in_(exited),
                                              m.c.evaluated_at <= now))
    changed = [(u, True) for u in entered] + [(u, False) for u in exited]
    if not changed:
        return []
    changed.sort()
    await conn.execute(sa.insert(segment_changes), [
        {"segment": seg.name, "user_id": u, "entered": e, "at": now} for u, e in changed])
    causes = causes or {}
    return [MembershipChange(segment=seg.name, user_id=u, entered=e, at=now,
                             event_id=causes.get(u)) for u, e in changed]


# What a user is, to one batch's diff query: a match of the segment's SELECT, a member
# put there at or before this evaluation, or a member put there by a newer one. Only an
# existing user matches (a segment over events alone could name a forgotten one).
_MATCH, _MEMBER, _NEWER_MEMBER = 1, 2, 4
_ENTER, _EXIT = _MATCH, _MEMBER  # the only sums of distinct kinds that are changes


def membership_diff(seg: CompiledSegment, user_ids: Sequence[str],
                    now: dt.datetime) -> Select[object, int]:
    """The changes of ``seg`` among ``user_ids`` at ``now``, as ``(user_id, kind)`` rows.

    The segment's matches and the stored members are compared in the database, so a
    batch that changes nothing returns no rows (rather than every match and every
    member for Python to compare). ``kind`` is ``_ENTER`` (matches, not a member) or
    ``_EXIT`` (a member, no longer matches). The race rule: a member row put there by
    a newer evaluation (``evaluated_at > now``) is neither entered again nor exited.
    Duplicate ids in the segment's result count once (``SUM(DISTINCT kind)``).
    """
    m = segment_members
    ids = list(user_ids)
    found = seg.among(ids).subquery("found")
    fid = next(iter(found.c))
    matches = (sa.select(fid.label("uid"), sa.literal(_MATCH).label("kind"))
               .select_from(found.join(users, users.c.id == fid)))
    members = sa.select(
        m.c.user_id.label("uid"),
        sa.case((m.c.evaluated_at <= now, _MEMBER), else_=_NEWER_MEMBER).label("kind"),
    ).where(m.c.segment == seg.name, m.c.user_id.in_(ids))
    both = sa.union_all(matches, members).subquery("both_")
    total = sa.func.sum(both.c.kind.distinct())
    return (sa.select(both.c.uid, total).group_by(both.c.uid)
            .having(total.in_([_ENTER, _EXIT])))


async def refresh_diff(conn: AsyncConnection, seg: CompiledSegment,
                        now: dt.datetime) -> tuple[int, int, int, int]:
    """Write the segment's changes at ``now`` into segment_changes and apply them.

    Returns (change id before, last change id, entered, exited): the changes are the
    rows of this segment with ``before < id <= last``.
    """
    m, c, name = segment_members, segment_changes, seg.name
    seg_q = seg.query.subquery("seg")
    sid = next(iter(seg_q.c))
    label = sa.literal(name, type_=c.c.segment.type)
    at = sa.literal(now, type_=sa.DateTime())
    cols = ["segment", "user_id", "entered", "at"]
    before = int((await conn.execute(sa.select(sa.func.max(c.c.id)))).scalar() or 0)
    # Entries: in the segment, an existing user, not a member.
    entries = (
        sa.select(label, sid, sa.literal(True), at).distinct()
        .select_from(seg_q.join(users, users.c.id == sid)
                     .outerjoin(m, sa.and_(m.c.segment == name, m.c.user_id == sid)))
        .where(m.c.user_id.is_(None)))
    entered = (await conn.execute(sa.insert(c).from_select(cols, entries))).rowcount
    mid = int((await conn.execute(sa.select(sa.func.max(c.c.id)))).scalar() or 0)
    if entered:
        await conn.execute(sa.insert(m).from_select(
            ["segment", "user_id", "entered_at", "evaluated_at"],
            sa.select(c.c.segment, c.c.user_id, c.c.at, c.c.at)
            .where(c.c.segment == name, c.c.id > before, c.c.id <= mid)))
    # Exits: members the segment no longer returns (or whose user is gone), unless a
    # newer result put them there.
    returned = sa.select(sid).select_from(seg_q.join(users, users.c.id == sid)).subquery("ok")
    rid = next(iter(returned.c))
    exits = (
        sa.select(label, m.c.user_id, sa.literal(False), at)
        .select_from(m.outerjoin(returned, rid == m.c.user_id))
        .where(m.c.segment == name, rid.is_(None), m.c.evaluated_at <= now))
    exited = (await conn.execute(sa.insert(c).from_select(cols, exits))).rowcount
    after = int((await conn.execute(sa.select(sa.func.max(c.c.id)))).scalar() or 0)
    last = mid
    while exited and last < after:
        rows = (await conn.execute(
            sa.select(c.c.id, c.c.user_id).where(c.c.segment == name, c.c.id > last,
                                                 c.c.id <= after)
            .order_by(c.c.id).limit(CHANGES_CHUNK))).all()
        if not rows:
            break
        last = int(rows[-1][0])
        await conn.execute(sa.delete(m).where(m.c.segment == name,
                                              m.c.user_id.in_([str(r[1]) for r in rows])))
    return before, after, max(0, entered), max(0, exited)


async def sweep_orphans(conn: AsyncConnection, user_ids: Sequence[str],
                        skip: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Delete the memberships and changes of those of ``user_ids`` that are no user, in
    every segment but ``skip``; return the (segment, user) memberships deleted.

    An evaluation or refresh that read a user before their forget committed may write
    their rows after it (MySQL, READ COMMITTED). The caller skips the segments refreshing
    now (their rows may be uncommitted) and sweeps those once they end; no other writer
    of these rows runs meanwhile, so a plain read finds what there is, and each row is
    deleted by its primary key (never waiting on another segment's uncommitted rows).
    """
    m, c, out = segment_members, segment_changes, []
    skipped = set(skip)
    for i in range(0, len(user_ids), CHANGES_CHUNK):
        chunk = list(user_ids[i:i + CHANGES_CHUNK])
        alive = await existing_users(conn, chunk)
        dead = [u for u in chunk if u not in alive]
        if not dead:
            continue
        found = sorted((str(seg), str(uid)) for seg, uid in await conn.execute(
            sa.select(m.c.segment, m.c.user_id).where(m.c.user_id.in_(dead)))
            if str(seg) not in skipped)
        for seg in sorted({seg for seg, _ in found}):
            await conn.execute(sa.delete(m).where(m.c.segment == seg, m.c.user_id.in_(
                [uid for s_, uid in found if s_ == seg])))
        changes = [int(cid) for cid, seg in await conn.execute(
            sa.select(c.c.id, c.c.segment).where(c.c.user_id.in_(dead)))
            if str(seg) not in skipped]
        if changes:
            await conn.execute(sa.delete(c).where(c.c.id.in_(changes)))
        out += found
    return out


async def member_count(conn: AsyncConnection, name: str) -> int:
    """How many members segment ``name`` has in the store."""
    m = segment_members
    return int((await conn.execute(sa.select(sa.func.count()).select_from(m)
                                   .where(m.c.segment == name))).scalar() or 0)


async def save_state(conn: AsyncConnection, name: str, **values: object) -> None:
    t = segment_state
    done = await conn.execute(sa.update(t).where(t.c.segment == name).values(**values))
    if done.rowcount == 0:
        await conn.execute(sa.insert(t).values(segment=name, **values))
