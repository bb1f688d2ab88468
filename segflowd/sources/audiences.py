"""Audience sync: a data source's audience, copied into users on the refresh schedule.

Each audience segment (``app.audience_segment``) is synced at start and then every
``refresh``: its audience query runs on the customer database, each row's profile is
upserted as a user (id = ``profile_id``, ``email``, the row's columns merged into
``attributes``), and ``audience_members`` is made to hold exactly the rows returned. The
segment itself is plain SQL over ``audience_members``, so the segment engine evaluates it
like any other: the users a sync touched are handed to the ingest sinks, and entries and
exits flow exactly as for SQL segments.

A sync that fails part-way (the source is down, a bad row) removes nobody: members are
only dropped once the whole audience has been read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import anyio
import sqlalchemy as sa
import structlog
from anyio.abc import TaskStatus
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import SegflowError, SourceError
from ..hooks import IngestBatch, IngestSink
from ..ingest.users import check_email, forgotten_among, merge_attributes, with_phone
from ..schema import audience_members, users
from ..store import Store
from .datasources import DataSources
from .picked import PickError, check_values, picked_name
from .pools import Row

if TYPE_CHECKING:
    from ..http import Router
    from ..kernel import Kernel

__all__ = ["AudienceService", "AudienceStatistics", "SyncResult"]

PREVIEW_SAMPLE = 5  # profiles shown by a dry run

log = structlog.get_logger("segflowd.audiences")

RETRY_AFTER_FAILURE = 60.0  # seconds before a failed sync is tried again
SCHEDULER_MAX_SLEEP = 60.0  # seconds between looks at the schedule, at most
ID_LIMIT = 191  # characters of a user id (schema.Id)
EMAIL_LIMIT = 320  # characters of users.email
SYNC_TABLES = frozenset({"users", "audience_members"})  # what a sync writes
LATE_FORGET = 3600.0  # seconds: a tombstone this recent is of a forget racing the sync


@dataclasses.dataclass(frozen=True)
class SyncResult:
    audience: str
    size: int
    joined: int
    left: int
    updated: int  # existing users whose attributes or email changed
    skipped: int  # rows without a usable profile id
    forgotten: int = 0  # rows of ids forgotten within ``[retention] forget_window``: not synced


@dataclasses.dataclass(frozen=True)
class AudienceStatistics:
    audiences: int
    syncs: int
    failures: int
    profiles_synced: int
    last_errors: Mapping[str, str]


@dataclasses.dataclass
class _State:
    next_at: dt.datetime | None = None
    syncing: bool = False
    last: SyncResult | None = None
    error: str | None = None


class AudienceService:
    """Syncs every audience segment of the app on its schedule (a daemon Service)."""

    name = "audiences"

    def __init__(self, k: Kernel, data_sources: DataSources, *,
                 ingest_sinks: Sequence[IngestSink] = ()) -> None:
        self.k = k
        self.ds = data_sources
        self.sinks = ingest_sinks
        self._state = {name: _State() for name in data_sources.audiences}
        self._locks = {name: anyio.Lock() for name in data_sources.audiences}
        self._syncs = 0
        self._failures = 0
        self._profiles = 0
        k.actions["audiences.list"] = self._action_list
        k.actions["audiences.pick"] = self._action_pick
        k.stats["audiences"] = self.statistics

    # -- service -----------------------------------------------------------------------

    def register_routes(self, router: Router) -> None:
        return None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        now = self.k.clock.now()
        for st in self._state.values():
            st.next_at = now  # the first sync of every audience happens at start
        task_status.started()
        if not self._state:
            await anyio.sleep_forever()
        while True:
            await self.sync_due()
            now = self.k.clock.now()
            nexts = [s.next_at for s in self._state.values() if s.next_at is not None]
            wait = min([(t - now).total_seconds() for t in nexts] or [SCHEDULER_MAX_SLEEP])
            wait = max(0.0, min(wait, SCHEDULER_MAX_SLEEP))
            await self.k.clock.sleep(wait)

    async def drain(self) -> None:
        return None

    # -- syncing -----------------------------------------------------------------------

    async def sync_due(self) -> list[SyncResult]:
        """Sync every audience whose time has come; a failure is recorded, not raised."""
        now = self.k.clock.now()
        out: list[SyncResult] = []
        for name, st in self._state.items():
            if st.next_at is not None and st.next_at <= now and not st.syncing:
                # A failure is recorded and logged by sync(); the others go on.
                with contextlib.suppress(Exception):
                    out.append(await self.sync(name))
        return out

    async def sync(self, name: str) -> SyncResult:
        """Sync audience segment ``name`` now; a failure is recorded and raised (a
        SourceError, or the store's error)."""
        a = self.ds.audiences.get(name)
        if a is None:
            known = ", ".join(sorted(self.ds.audiences)) or "none"
            raise SourceError("", f"no audience segment {name!r} (audience segments: {known})")
        st = self._state.setdefault(name, _State())
        async with self._locks.setdefault(name, anyio.Lock()):
            st.syncing = True
            started = self.k.clock.now()
            try:
                result = await self._sync(name, a.data_source, a.values, started)
            except Exception as exc:
                # Any failure, a SourceError or the store's own (a lost connection, a
                # deadlock): recorded and retried later, never the end of the daemon.
                error = str(exc) if isinstance(exc, SegflowError) else \
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                self._failures += 1
                st.error = error
                st.next_at = started + dt.timedelta(seconds=min(a.refresh, RETRY_AFTER_FAILURE))
                log.warning("audience.sync_failed", audience=name, error=error)
                self.k.bus.publish("audience.sync_failed", audience=name, error=error)
                raise
            finally:
                st.syncing = False
        st.last, st.error = result, None
        st.next_at = started + dt.timedelta(seconds=a.refresh)
        self._syncs += 1
        self._profiles += result.size
        log.info("audience.synced", audience=name, size=result.size, joined=result.joined,
                 left=result.left, updated=result.updated)
        self.k.bus.publish("audience.synced", audience=name, size=result.size,
                           joined=result.joined, left=result.left, updated=result.updated)
        return result

    async def sync_picked(self, data_source: str, values: Mapping[str, object]
                          ) -> SyncResult:
        """Sync the audience of a pick (a data source's values chosen at run time) under
        its generated segment name (:func:`~segflowd.sources.picked.picked_name`) now.

        PickError or SourceError for a bad pick, before anything is written; a failure
        while syncing removes nobody (as for declared audiences)."""
        name = self._picked(data_source, values)
        async with self._locks.setdefault(name, anyio.Lock()):
            result = await self._sync(name, data_source, values, self.k.clock.now())
        self._syncs += 1
        self._profiles += result.size
        log.info("audience.synced", audience=name, size=result.size, joined=result.joined,
                 left=result.left, updated=result.updated, picked=True)
        self.k.bus.publish("audience.synced", audience=name, size=result.size,
                           joined=result.joined, left=result.left, updated=result.updated)
        return result

    async def preview(self, data_source: str, values: Mapping[str, object],
                      sample: int = PREVIEW_SAMPLE) -> dict[str, object]:
        """A pick's audience without writing anything: its size and the first
        ``sample`` profiles (with their preload row as ``profile``, if any)."""
        name = self._picked(data_source, values)
        count, rows = 0, list[Row]()
        async for batch in self.ds.audience(data_source, values):
            count += len(batch)
            rows.extend(batch[:max(0, sample - len(rows))])
        for r in rows:
            pre = await self.ds.preload(data_source, str(r["profile_id"]), values)
            if pre is not None:
                r["profile"] = pre
        return {"segment": name, "data_source": data_source, "values": dict(values),
                "count": count, "sample": rows}

    def _picked(self, data_source: str, values: Mapping[str, object]) -> str:
        check_values(self.ds.get(data_source), values)
        return picked_name(data_source, values)

    async def _sync(self, audience: str, data_source: str, values: Mapping[str, object],
                    now: dt.datetime) -> SyncResult:
        store = self.k.store
        seen: set[str] = set()
        joined = updated = skipped = forgotten = 0
        window = self.k.config.retention.forget_window
        async for batch in self.ds.audience(data_source, values):
            rows: dict[str, Row] = {}
            for r in batch:
                pid = str(r["profile_id"])
                if len(pid) > ID_LIMIT or pid in seen:
                    skipped += 1
                    continue
                rows[pid] = r
            if not rows:
                continue
            at = self.k.clock.now()  # as ingest, the window is reckoned per write
            since = None if window is None else at - dt.timedelta(seconds=float(window))
            # A forget committing while this batch runs has a tombstone this fresh; an
            # expired one (ingest may have taken the id again) is much older.
            margin = LATE_FORGET if window is None else min(LATE_FORGET, float(window) / 2)
            fresh = at - dt.timedelta(seconds=margin)
            async with store.begin() as conn:
                changed, n_updated, new_members, refused = await _apply_batch(
                    store, conn, audience, rows, now, since, fresh)
            forgotten += len(refused)
            seen.update(set(rows) - refused)
            updated += n_updated
            joined += len(new_members)
            self._tell(changed | new_members)
        am = audience_members.c
        async with store.begin() as conn:
            gone = [r[0] for r in await conn.execute(sa.select(am.user_id).where(
                am.audience == audience)) if r[0] not in seen]
            for i in range(0, len(gone), 500):
                await conn.execute(sa.delete(audience_members).where(
                    am.audience == audience, am.user_id.in_(gone[i:i + 500])))
        self._tell(set(gone))
        return SyncResult(audience=audience, size=len(seen), joined=joined, left=len(gone),
                          updated=updated, skipped=skipped, forgotten=forgotten)

    def _tell(self, user_ids: set[str]) -> None:
        if not user_ids:
            return
        batch = IngestBatch(users=frozenset(user_ids), events=(), tables=SYNC_TABLES)
        for sink in self.sinks:
            sink.ingested(batch)

    # -- control -----------------------------------------------------------------------

    async def _action_list(self, args: Mapping[str, object]) -> object:
        """``audiences.list``: with ``source`` (a data source), its discovery rows; else
        the data sources and audience segments."""
        name = args.get("data_source", args.get("source"))
        if name is not None:
            return {"data_source": str(name), "rows": await self.ds.discover(str(name))}
        return {
            "data_sources": [{"name": d.name, "source": d.source,
                              "discovery": d.discovery is not None,
                              "preload": d.preload is not None,
                              "placeholders": list(d.audience.names)}
                             for d in self.ds.defs.values()],
            "audiences": [{"segment": a.name, "data_source": a.data_source,
                           "values": {k: str(v) for k, v in a.values.items()},
                           "size": st.last.size if st.last else None,
                           "error": st.error}
                          for a in self.ds.audiences.values()
                          for st in [self._state.get(a.name, _State())]],
        }

    async def _action_pick(self, args: Mapping[str, object]) -> object:
        """``audiences.pick``: ``data_source`` and ``values`` (an object of typed values);
        with ``dry_run`` its size and a sample, else synced now under its generated
        segment (which ``broadcast.launch`` then sends to)."""
        name = args.get("data_source")
        values = args.get("values", {})
        if not isinstance(name, str) or not name:
            raise PickError("data_source is required: the data source whose audience to pick")
        if not isinstance(values, Mapping):
            raise PickError("values must be a JSON object of the audience's placeholders")
        if args.get("dry_run"):
            return await self.preview(name, values)
        r = await self.sync_picked(name, values)
        return {"segment": r.audience, "data_source": name, "values": dict(values),
                "size": r.size, "joined": r.joined, "left": r.left, "updated": r.updated,
                "skipped": r.skipped, "forgotten": r.forgotten}

    def statistics(self) -> AudienceStatistics:
        return AudienceStatistics(
            audiences=len(self._state), syncs=self._syncs, failures=self._failures,
            profiles_synced=self._profiles,
            last_errors={n: s.error for n, s in self._state.items() if s.error})


async def _apply_batch(store: Store, conn: AsyncConnection, audience: str,
                       rows: Mapping[str, Row], now: dt.datetime, since: dt.datetime | None,
                       fresh: dt.datetime | None = None,
                       ) -> tuple[set[str], int, set[str], set[str]]:
    """Upsert the batch's users and memberships.

    Returns the users created or changed, how many existing users changed, the users
    that are new members of the audience, and the ids left out because they were
    forgotten at ``since`` or later (any time, with None), as ingest refuses them: the
    customer's database still listing someone does not undo ``DELETE /v1/users``.
    A user that exists is never deleted here, tombstone or not (ingest may have taken
    the id again once its window passed); one this batch created is, if a forget of
    the id committed meanwhile (a tombstone from ``fresh`` on).

    Ingest commits users concurrently (its own connection, READ COMMITTED on MariaDB):
    missing users are created with INSERT IGNORE, so one ingest created meanwhile is no
    error, and every row is then read again under a lock (``FOR UPDATE``; SQLite's
    ``BEGIN IMMEDIATE`` already serialises writers) and the row merged onto what is
    stored now, so an ingest write committed after the first read is kept.
    """
    u, am = users.c, audience_members.c
    ids = sorted(rows)
    before = {r[0] for r in await conn.execute(sa.select(u.id).where(u.id.in_(ids)))}
    refused = await forgotten_among(conn, set(ids) - before, since)
    ids = [pid for pid in ids if pid not in refused]
    members = {r[0] for r in await conn.execute(sa.select(am.user_id).where(
        am.audience == audience, am.user_id.in_(ids)))}
    changes = {pid: _changes(row) for pid, row in rows.items()}
    created = [pid for pid in ids if pid not in before]
    if created:
        inserts = []
        for pid in created:
            attrs = with_phone(merge_attributes({}, changes[pid]))
            inserts.append({"id": pid, "email": _email(changes[pid], None),
                            "attributes": attrs, "created_at": now, "updated_at": now})
        await conn.execute(store.insert_ignore(users), inserts)
    current = {r.id: r for r in await conn.execute(
        sa.select(u.id, u.email, u.attributes).where(u.id.in_(ids)).order_by(u.id)
        .with_for_update())}
    # Read after the lock: a forget of one of those this batch created has committed by
    # now (its fresh tombstone is seen; the INSERT waited for its delete) or begins after
    # this transaction (and deletes what it wrote). Such a row is this batch's own.
    late = await forgotten_among(conn, created, fresh or now)
    if late:
        await conn.execute(sa.delete(users).where(u.id.in_(sorted(late))))
        refused |= late
        ids = [pid for pid in ids if pid not in late]
        created = [pid for pid in created if pid not in late]
    updates: list[dict[str, object]] = []
    changed = set(created)
    n_updated = 0
    for pid in ids:
        row = current.get(pid)
        if row is None:  # pragma: no cover - deleted between our insert and this read
            continue
        stored = dict(row.attributes or {})
        merged = with_phone(merge_attributes(stored, changes[pid]))
        email = _email(changes[pid], row.email)
        if merged != stored or email != row.email:
            updates.append({"b_id": pid, "email": email, "attributes": merged,
                            "updated_at": now})
            changed.add(pid)
            n_updated += pid in before
    if updates:
        await conn.execute(sa.update(users).where(u.id == sa.bindparam("b_id")), updates)
    new_members = [pid for pid in ids if pid not in members]
    if new_members:
        await conn.execute(store.insert_ignore(audience_members), [
            {"audience": audience, "user_id": pid, "joined_at": now} for pid in new_members])
    return changed, n_updated, set(new_members), refused


def _changes(row: Row) -> dict[str, object]:
    """A row's columns as attribute changes (``profile_id`` is the id, not an attribute)."""
    return {k: v for k, v in row.items() if k != "profile_id"}


def _email(changes: Mapping[str, object], old: str | None) -> str | None:
    """``users.email`` after a row: as ingest, an ``email`` column that is null (or
    empty) removes the address; an audience without the column leaves it as it was."""
    if "email" not in changes:
        return old
    value = changes["email"]
    # Normalised as ingest does; an invalid one is kept as it is (delivery refuses it).
    return check_email(str(value))[0][:EMAIL_LIMIT] if value else None
