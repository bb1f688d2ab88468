"""Read-only snapshot queries for the control socket (and so the TUI and the CLI).

Each function opens one read connection, runs a few Core queries over the daemon's
tables and returns plain JSON-able dicts. Nothing here writes, and nothing here knows
how the engines fill the tables: it reads flow_instances/flow_journal, segment_state/
segment_members, users and messages as the schema documents them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from ..app import Segflow
from ..errors import StoreError
from ..flows.held import waiting_entries
from ..schema import (
    campaign_settings,
    engagement,
    events,
    flow_instances,
    flow_journal,
    messages,
    segment_changes,
    segment_members,
    segment_state,
    users,
)
from ..store import Store

__all__ = [
    "FAILED_MESSAGE_STATUSES",
    "INSTANCE_STATUSES",
    "LIVE_STATUSES",
    "PENDING_MESSAGE_STATUSES",
    "campaign_detail",
    "campaigns",
    "health",
    "messages_page",
    "outbox_depth",
    "segments",
    "user_detail",
]

INSTANCE_STATUSES = ("running", "waiting", "completed", "exited", "failed", "diverged",
                     "terminated")
LIVE_STATUSES = ("running", "waiting")
PENDING_MESSAGE_STATUSES = ("queued", "claimed", "sending")
FAILED_MESSAGE_STATUSES = ("failed", "unknown")
USER_LIMIT = 50  # instances, messages and events shown for one user
JOURNAL_LIMIT = 200  # journal entries shown per instance

Row = dict[str, object]


def _message_row(r: Any) -> Row:  # Any: a Core row of _MESSAGE_COLUMNS
    return {
        "id": r.id, "user_id": r.user_id, "kind": r.kind, "channel": r.channel,
        "campaign": r.campaign,
        "transaction": r.transaction, "instance_id": r.instance_id, "template": r.template,
        "to": r.to_address, "status": r.status, "provider": r.provider,
        "attempts": r.attempts, "last_error": r.last_error, "created_at": r.created_at,
        "updated_at": r.updated_at, "sent_at": r.sent_at,
        "next_attempt_at": r.next_attempt_at,
    }


_MESSAGE_COLUMNS = (
    messages.c.id, messages.c.user_id, messages.c.kind, messages.c.channel, messages.c.campaign,
    messages.c.transaction, messages.c.instance_id, messages.c.template,
    messages.c.to_address, messages.c.status, messages.c.provider, messages.c.attempts,
    messages.c.last_error, messages.c.created_at, messages.c.updated_at, messages.c.sent_at,
    messages.c.next_attempt_at,
)


async def campaigns(store: Store, app: Segflow) -> list[Row]:
    """Every campaign the app defines or the store has instances of, with counts by status."""
    q = (sa.select(flow_instances.c.campaign, flow_instances.c.status,
                   sa.func.count().label("n"))
         .group_by(flow_instances.c.campaign, flow_instances.c.status))
    vq = (sa.select(flow_instances.c.campaign, flow_instances.c.version,
                    sa.func.count().label("n"))
          .where(flow_instances.c.live.is_not(None))
          .group_by(flow_instances.c.campaign, flow_instances.c.version))
    pq = sa.select(campaign_settings.c.campaign).where(campaign_settings.c.paused.is_(True))
    async with store.connect() as conn:
        counts = (await conn.execute(q)).all()
        versions = (await conn.execute(vq)).all()
        paused = {r.campaign for r in (await conn.execute(pq)).all()}
    out: dict[str, Row] = {}
    for name, c in app.campaigns.items():
        out[name] = _campaign_row(name, c.version, c.segments)
    for r in counts:
        row = out.setdefault(r.campaign, _campaign_row(r.campaign, None, ()))
        by_status = row["instances"]
        assert isinstance(by_status, dict)
        by_status[r.status] = by_status.get(r.status, 0) + int(r.n)
    for r in versions:
        row = out.setdefault(r.campaign, _campaign_row(r.campaign, None, ()))
        live = row["live_versions"]
        assert isinstance(live, dict)
        live[r.version] = int(r.n)
    for name in paused:
        out.setdefault(name, _campaign_row(name, None, ()))
    waiting = await waiting_entries(store, app) if paused else {}  # held for the resume
    for row in out.values():
        row["paused"] = row["name"] in paused
        row["waiting_entries"] = waiting.get(str(row["name"]), 0)
        by_status = row["instances"]
        assert isinstance(by_status, dict)
        row["total"] = sum(by_status.values())
        row["live"] = sum(by_status.get(s, 0) for s in LIVE_STATUSES)
    return [out[k] for k in sorted(out)]


def _campaign_row(name: str, version: str | None, segs: Sequence[str]) -> Row:
    return {"name": name, "version": version, "defined": version is not None,
            "segments": list(segs), "instances": {s: 0 for s in INSTANCE_STATUSES},
            "live_versions": {}}


async def campaign_detail(store: Store, app: Segflow, name: str) -> Row | None:
    """One campaign: its counts and the funnel, per journal step.

    A step is a journal position (``seq``) with its kind and name. ``reached`` counts the
    instances that recorded it; ``here`` counts the live instances whose latest step it is.
    """
    rows = [r for r in await campaigns(store, app) if r["name"] == name]
    if not rows:
        return None
    row = rows[0]
    fi, fj = flow_instances, flow_journal
    reached_q = (sa.select(fj.c.seq, fj.c.kind, fj.c.name, sa.func.count().label("n"))
                 .select_from(fj.join(fi, fi.c.id == fj.c.instance_id))
                 .where(fi.c.campaign == name)
                 .group_by(fj.c.seq, fj.c.kind, fj.c.name)
                 .order_by(fj.c.seq, fj.c.kind, fj.c.name))
    last = (sa.select(fj.c.instance_id, sa.func.max(fj.c.seq).label("last_seq"))
            .select_from(fj.join(fi, fi.c.id == fj.c.instance_id))
            .where(fi.c.campaign == name, fi.c.live.is_not(None))
            .group_by(fj.c.instance_id).subquery())
    here_q = (sa.select(fj.c.seq, fj.c.kind, fj.c.name, sa.func.count().label("n"))
              .select_from(fj.join(last, sa.and_(last.c.instance_id == fj.c.instance_id,
                                                 last.c.last_seq == fj.c.seq)))
              .group_by(fj.c.seq, fj.c.kind, fj.c.name))
    async with store.connect() as conn:
        reached = (await conn.execute(reached_q)).all()
        here = {(r.seq, r.kind, r.name): int(r.n) for r in (await conn.execute(here_q)).all()}
    row["funnel"] = [
        {"seq": r.seq, "kind": r.kind, "name": r.name, "reached": int(r.n),
         "here": here.get((r.seq, r.kind, r.name), 0)}
        for r in reached
    ]
    return row


async def segments(store: Store, app: Segflow) -> list[Row]:
    """Every segment with its size (members now), last and next refresh, last error."""
    state_q = sa.select(segment_state)
    count_q = (sa.select(segment_members.c.segment, sa.func.count().label("n"))
               .group_by(segment_members.c.segment))
    async with store.connect() as conn:
        state = {r.segment: r for r in (await conn.execute(state_q)).all()}
        members = {r.segment: int(r.n) for r in (await conn.execute(count_q)).all()}
    names = sorted({*app.segments, *state, *members})
    out: list[Row] = []
    for name in names:
        st = state.get(name)
        definition = app.segments.get(name)
        out.append({
            "name": name,
            "defined": definition is not None,
            "refresh_s": definition.refresh if definition is not None else None,
            "size": members.get(name, 0),
            "last_refresh_at": st.last_refresh_at if st is not None else None,
            "next_refresh_at": st.next_refresh_at if st is not None else None,
            "last_error": st.last_error if st is not None else None,
        })
    return out


async def user_detail(store: Store, user_id: str, *, limit: int = USER_LIMIT) -> Row | None:
    """One user: attributes, segments, instances (each with its journal), messages, events.

    None when the store knows nothing at all of ``user_id``.
    """
    fi = flow_instances
    async with store.connect() as conn:
        u = (await conn.execute(sa.select(users).where(users.c.id == user_id))).first()
        segs = (await conn.execute(
            sa.select(segment_members.c.segment, segment_members.c.entered_at)
            .where(segment_members.c.user_id == user_id)
            .order_by(segment_members.c.segment))).all()
        inst = (await conn.execute(
            sa.select(fi).where(fi.c.user_id == user_id)
            .order_by(fi.c.created_at.desc(), fi.c.id.desc()).limit(limit))).all()
        journal: dict[int, list[Row]] = {}
        if inst:
            jq = (sa.select(flow_journal)
                  .where(flow_journal.c.instance_id.in_([i.id for i in inst]))
                  .order_by(flow_journal.c.instance_id, flow_journal.c.seq))
            for j in (await conn.execute(jq)).all():
                entries = journal.setdefault(int(j.instance_id), [])
                if len(entries) < JOURNAL_LIMIT:
                    entries.append({"seq": j.seq, "kind": j.kind, "name": j.name,
                                    "result": j.result, "at": j.created_at})
        msgs = (await conn.execute(
            sa.select(*_MESSAGE_COLUMNS).where(messages.c.user_id == user_id)
            .order_by(messages.c.created_at.desc(), messages.c.id.desc()).limit(limit))).all()
        evs = (await conn.execute(
            sa.select(events.c.id, events.c.name, events.c.attributes, events.c.created_at)
            .where(events.c.user_id == user_id)
            .order_by(events.c.created_at.desc(), events.c.id.desc()).limit(limit))).all()
        changes, engaged = await _user_changes(conn, user_id, limit)
    if u is None and not segs and not inst and not msgs and not evs:
        return None
    return {
        "id": user_id,
        "known": u is not None,
        "email": u.email if u is not None else None,
        "attributes": u.attributes if u is not None else {},
        "created_at": u.created_at if u is not None else None,
        "updated_at": u.updated_at if u is not None else None,
        "segments": [{"name": s.segment, "entered_at": s.entered_at} for s in segs],
        "instances": [
            {"id": i.id, "campaign": i.campaign, "version": i.version, "status": i.status,
             "live": i.live is not None, "wake_at": i.wake_at, "wait_event": i.wait_event,
             "error": i.error, "created_at": i.created_at, "updated_at": i.updated_at,
             "ended_at": i.ended_at, "journal": journal.get(int(i.id), [])}
            for i in inst
        ],
        "messages": [_message_row(m) for m in msgs],
        "events": [{"id": e.id, "name": e.name, "attributes": e.attributes,
                    "at": e.created_at} for e in evs],
        "segment_changes": changes,
        "engagement": engaged,
    }


async def _user_changes(conn: Any, user_id: str, limit: int) -> tuple[list[Row], list[Row]]:
    """The user's latest segment entries/exits and opens/clicks, newest first."""
    sc, en = segment_changes.c, engagement.c
    changes = (await conn.execute(
        sa.select(sc.segment, sc.entered, sc.at).where(sc.user_id == user_id)
        .order_by(sc.id.desc()).limit(limit))).all()
    engaged = (await conn.execute(
        sa.select(en.message_id, en.kind, en.url, en.hits, en.machine, en.created_at,
                  en.last_at).where(en.user_id == user_id)
        .order_by(en.id.desc()).limit(limit))).all()
    return ([{"segment": c.segment, "entered": bool(c.entered), "at": c.at} for c in changes],
            [{"message_id": e.message_id, "kind": e.kind, "url": e.url, "hits": e.hits,
              "machine": bool(e.machine), "at": e.created_at, "last_at": e.last_at}
             for e in engaged])


async def messages_page(store: Store, *, limit: int = 100, failures: bool = False,
                        campaign: str | None = None) -> list[Row]:
    """The most recent messages, newest first (only failures when ``failures``)."""
    q = sa.select(*_MESSAGE_COLUMNS)
    if failures:
        q = q.where(messages.c.status.in_(FAILED_MESSAGE_STATUSES))
    if campaign:
        q = q.where(messages.c.campaign == campaign)
    q = q.order_by(messages.c.created_at.desc(), messages.c.id.desc()).limit(limit)
    async with store.connect() as conn:
        return [_message_row(r) for r in (await conn.execute(q)).all()]


async def outbox_depth(store: Store) -> dict[str, int]:
    """Messages waiting in the outbox, by status (queued, claimed, sending)."""
    q = (sa.select(messages.c.status, sa.func.count().label("n"))
         .where(messages.c.status.in_(PENDING_MESSAGE_STATUSES))
         .group_by(messages.c.status))
    async with store.connect() as conn:
        found = {r.status: int(r.n) for r in (await conn.execute(q)).all()}
    return {s: found.get(s, 0) for s in PENDING_MESSAGE_STATUSES}


HEALTH_WINDOW = 3600.0  # seconds: "the last hour" of the dashboard's failure counts
TOP_ERRORS = 5


async def health(store: Store, now: dt.datetime) -> Row | None:
    """What the dashboard warns about: outbox age, the last hour's failures and entries.

    None when the store fails to answer (``status`` still answers: its ``store`` says so).

    ``failures_1h`` counts messages that failed (or ended unknown) and instances that
    failed or diverged in the last hour; ``top_errors`` are their commonest error texts;
    ``campaigns`` maps a campaign to its entries (instances started) and failures in the
    last hour; ``instances`` counts the failed and diverged instances in the store.
    """
    try:
        return await _health(store, now)
    except (StoreError, OSError):
        return None


async def _health(store: Store, now: dt.datetime) -> Row:
    since = now - dt.timedelta(seconds=HEALTH_WINDOW)
    m, fi = messages.c, flow_instances.c
    bad = ("failed", "diverged")
    async with store.connect() as conn:
        oldest = (await conn.execute(sa.select(sa.func.min(m.created_at))
                                     .where(m.status == "queued"))).scalar()
        failed_msgs = (await conn.execute(
            sa.select(m.campaign, m.last_error, sa.func.count().label("n"))
            .where(m.status.in_(FAILED_MESSAGE_STATUSES), m.updated_at >= since)
            .group_by(m.campaign, m.last_error))).all()
        failed_inst = (await conn.execute(
            sa.select(fi.campaign, fi.error, sa.func.count().label("n"))
            .where(fi.status.in_(bad), fi.updated_at >= since)
            .group_by(fi.campaign, fi.error))).all()
        stuck = (await conn.execute(
            sa.select(fi.status, sa.func.count().label("n")).where(fi.status.in_(bad))
            .group_by(fi.status))).all()
        entries = (await conn.execute(
            sa.select(fi.campaign, sa.func.count().label("n")).where(fi.created_at >= since)
            .group_by(fi.campaign))).all()
    per: dict[str, dict[str, int]] = {}
    errors: dict[tuple[str, str], int] = {}
    for where, rows in (("message", failed_msgs), ("instance", failed_inst)):
        for r in rows:
            if r[0] is not None:
                c = per.setdefault(r[0], {"entries_1h": 0, "failures_1h": 0})
                c["failures_1h"] += int(r.n)
            key = (str(r[1] or "(no error text)"), where)
            errors[key] = errors.get(key, 0) + int(r.n)
    for r in entries:
        per.setdefault(r.campaign, {"entries_1h": 0, "failures_1h": 0})["entries_1h"] = int(r.n)
    top = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ERRORS]
    counts = {r.status: int(r.n) for r in stuck}
    return {
        "oldest_queued_s": round((now - oldest).total_seconds(), 3) if oldest else None,
        "failures_1h": sum(errors.values()),
        "top_errors": [{"error": e, "where": w, "count": n} for (e, w), n in top],
        "instances": {s: counts.get(s, 0) for s in bad},
        "campaigns": {k: per[k] for k in sorted(per)},
    }
