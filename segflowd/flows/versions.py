"""Flow versions: a changed flow is a new version; in-flight instances move only if safe.

At start the daemon dry-runs the journal of every in-flight instance pinned to an older
version against the new code: a clean replay moves the instance to the new version, a
divergence marks it ``diverged`` (no further effects until an operator terminates or
restarts it). :func:`reconcile_versions` with ``apply=False`` is the deploy preview that
``segflowd check`` prints: the same dry run, nothing written.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import inspect

import anyio.lowlevel
import sqlalchemy as sa

from ..app import CampaignDef, Segflow
from ..schema import campaign_versions, flow_instances
from ..store import Store
from .journal import Divergence, Replay, load_journals

__all__ = ["VersionReport", "preview_lines", "reconcile_versions", "record_versions"]

CHUNK = 500  # instances whose journals are loaded and dry-run per query
_ACTIVE = ("running", "waiting")


@dataclasses.dataclass(frozen=True)
class VersionReport:
    """What a deploy does to one changed campaign's in-flight instances."""

    campaign: str
    version: str  # the code's version now
    old_versions: tuple[str, ...]
    in_flight: int
    moved: int
    diverged: int
    reasons: tuple[tuple[str, int], ...]  # why they diverge, most common first
    diverged_instances: tuple[tuple[int, str], ...]  # (instance, reason)


def _source(c: CampaignDef) -> str:
    try:
        return inspect.getsource(c.flow)
    except (OSError, TypeError):
        return ""


async def record_versions(store: Store, app: Segflow, now: dt.datetime) -> None:
    """Remember each campaign's current code under its version (for later diffs)."""
    if not app.campaigns:
        return
    async with store.begin() as conn:
        for c in app.campaigns.values():
            await conn.execute(store.insert_ignore(campaign_versions).values(
                campaign=c.name, version=c.version, source=_source(c), created_at=now))


async def reconcile_versions(store: Store, app: Segflow, now: dt.datetime, *,
                             apply: bool) -> list[VersionReport]:
    """Dry-run every in-flight instance on an older version; with ``apply``, move or mark.

    Instances are read in chunks of :data:`CHUNK`, each journal in one query, and each
    replay is one pass over its journal. Only live instances on other versions are read
    (through ``ix_flow_instances_live_version``): a start with nothing to move costs an
    index seek per campaign, however many instances wait.
    """
    fi = flow_instances.c
    reports: list[VersionReport] = []
    for c in app.campaigns.values():
        version = c.version
        olds: set[str] = set()
        moved: list[int] = []
        diverged: list[tuple[int, str]] = []
        pending = await _other_versions(store, c)
        after = 0
        while pending:
            async with store.connect() as conn:
                rows = (await conn.execute(
                    sa.select(fi.id, fi.user_id, fi.version).where(
                        fi.campaign == c.name, fi.live == 1, fi.version == pending[0],
                        fi.status.in_(_ACTIVE), fi.id > after)
                    .order_by(fi.id).limit(CHUNK))).all()
                if not rows:
                    pending, after = pending[1:], 0
                    continue
                ids = [int(r[0]) for r in rows]
                journals = await load_journals(conn, ids)
            chunk_moved: list[int] = []
            chunk_div: list[tuple[int, str]] = []
            for iid, user_id, old in rows:
                olds.add(str(old))
                replay = Replay(c, str(user_id), journals.get(int(iid), []), live=None)
                try:
                    replay.replay()
                    chunk_moved.append(int(iid))
                except Divergence as d:
                    chunk_div.append((int(iid), d.reason))
                finally:
                    replay.close()
            after = ids[-1]
            moved.extend(chunk_moved)
            diverged.extend(chunk_div)
            if apply:
                await _apply(store, now, version, chunk_moved, chunk_div)
            await anyio.lowlevel.checkpoint()
        if not olds:
            continue
        reasons = collections.Counter(r for _, r in diverged)
        reports.append(VersionReport(
            campaign=c.name, version=version, old_versions=tuple(sorted(olds)),
            in_flight=len(moved) + len(diverged), moved=len(moved), diverged=len(diverged),
            reasons=tuple(reasons.most_common()), diverged_instances=tuple(diverged)))
    return reports


async def _other_versions(store: Store, c: CampaignDef) -> list[str]:
    """The versions other than the current one that live instances of ``c`` are pinned
    to: a loose index scan, one ``MIN`` seek per distinct version."""
    fi = flow_instances.c
    found: list[str] = []
    last: str | None = None
    async with store.connect() as conn:
        while True:
            q = sa.select(sa.func.min(fi.version)).where(fi.campaign == c.name, fi.live == 1)
            if last is not None:
                q = q.where(fi.version > last)
            last = (await conn.execute(q)).scalar()
            if last is None:
                return found
            if last != c.version:
                found.append(str(last))


async def _apply(store: Store, now: dt.datetime, version: str, move: list[int],
                 div: list[tuple[int, str]]) -> None:
    fi = flow_instances.c
    async with store.begin() as conn:
        if move:
            await conn.execute(sa.update(flow_instances).where(fi.id.in_(move)).values(
                version=version, updated_at=now))
        for iid, reason in div:
            await conn.execute(sa.update(flow_instances).where(fi.id == iid).values(
                status="diverged", wake_at=None, wait_event=None, updated_at=now,
                error=f"diverged from version {version}: {reason}"))


def preview_lines(reports: list[VersionReport]) -> list[str]:
    """The deploy preview as printed by ``segflowd check``."""
    if not reports:
        return ["flows: no in-flight instance runs changed code"]
    out: list[str] = []
    for r in reports:
        out.append(f"campaign {r.campaign!r} changed ({', '.join(r.old_versions)} -> "
                   f"{r.version}): {r.in_flight} in flight, {r.moved} would move, "
                   f"{r.diverged} would diverge")
        out.extend(f"  {n} x {reason}" for reason, n in r.reasons)
    return out

