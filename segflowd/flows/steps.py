"""Stepping instances in batches: load, replay, then run every instance one command a round.

A worker hands a batch of due instances here. Their rows, journals, users and entry
events are read in four queries; each instance is replayed; then, round after round,
every instance still running computes its next command and all of the round's steps
are written in one transaction (group commit). Each step stays atomic — its journal
row, instance update and outbox row commit together — and each instance update is
conditional on the sequence number it started from, so a step that lost a race (an
exit, a termination) writes nothing. If a round's transaction fails, its steps are
retried one transaction each, so one bad step cannot hold back the others.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from ..app import CampaignDef
from ..cursors import max_event_id
from ..delivery import outbox
from ..errors import FlowError
from ..schema import events, flow_instances, flow_journal, users
from ..store import is_unavailable
from . import work
from .journal import (
    Divergence,
    FlowCrashed,
    JournalRow,
    Replay,
    load_journals,
    result_for_flow,
)
from .localwait import plan_local_wait
from .reads import engaged, run_condition
from .runtime import WAIT_KINDS, Command
from .sends import QUEUEING, check_send, queued_by
from .split import assign, latest_variant
from .updates import LOAD_COLUMNS, Lost, traceback_text, update_instances
from .webhookwait import event_wait, is_webhook_wait, marker, unfinished
from .work import ACTIVE, StepHost, Work

__all__ = ["Stepper"]

log = structlog.get_logger("segflowd.flows")


@dataclasses.dataclass
class _Run:
    """One instance being stepped in this batch."""

    iid: int
    seq: int
    campaign: CampaignDef
    user_id: str
    replay: Replay
    result: object = None
    error: str | None = None
    fix: object = None  # result to record on the last (wait_for_event) journal row
    since_wait: int = 0
    cmd: Command | None = None
    cmd_result: object = None
    cmd_error: str | None = None
    end: str | None = None  # completed | failed | diverged: this round ends the instance
    end_error: str | None = None
    values: dict[str, object] = dataclasses.field(default_factory=dict)
    lost: bool = False
    tz: object = None  # the user's ``timezone`` attribute as loaded (rt.wait_until_local)
    variant: str | None = None  # its latest rt.split() result: its sends carry it


_ENDING = frozenset({"exit", "continue_as_new"})  # commands after which the instance is over


class Stepper:
    """The stepping half of :class:`~segflowd.flows.service.FlowService`."""

    def __init__(self, svc: StepHost) -> None:
        self.svc = svc
        self.k = svc.k

    # -- loading ---------------------------------------------------------------------

    async def run_batch(self, works: Sequence[Work]) -> None:
        runs = await self._load(works)
        try:
            while runs:
                await self._round(runs)
                runs = [r for r in runs if not (r.lost or r.end or r.cmd is None
                                                or r.cmd.kind in WAIT_KINDS
                                                or r.cmd.kind in _ENDING)]
                for r in runs:
                    r.result, r.error, r.fix = r.cmd_result, r.cmd_error, None
                    r.seq += 1
                # A campaign paused meanwhile takes no further step: its instances stay
                # ``running`` in the store, and resuming it queues them again.
                held = [r for r in runs if r.campaign.name in self.svc.paused]
                if held:
                    for r in held:
                        r.replay.close()
                    runs = [r for r in runs if r.campaign.name not in self.svc.paused]
        finally:
            for r in runs:
                r.replay.close()

    async def _load(self, works: Sequence[Work]) -> list[_Run]:
        fi = flow_instances.c
        ids = [w.instance for w in works]
        async with self.k.store.connect() as conn:
            insts = {int(r.id): r for r in await conn.execute(
                sa.select(*LOAD_COLUMNS).where(fi.id.in_(ids)))}
            journals = await load_journals(conn, ids)
            uids = {str(i.user_id) for i in insts.values()}
            people = {str(u.id): u for u in await conn.execute(
                sa.select(users.c.id, users.c.email, users.c.attributes).where(
                    users.c.id.in_(uids)))} if uids else {}
            eids = {int(i.entry_event_id) for i in insts.values()
                    if i.entry_event_id is not None}
            entries: dict[int, dict[str, object]] = {}
            if eids:
                for e in await conn.execute(sa.select(events).where(events.c.id.in_(eids))):
                    entries[int(e.id)] = {"id": e.id, "name": e.name,
                                          "attributes": dict(e.attributes or {}),
                                          "created_at": e.created_at.isoformat()}
        now = self.k.clock.now()
        runs: list[_Run] = []
        diverged: list[_Run] = []
        for w in works:
            inst = insts.get(w.instance)
            run = self._prepare(w, inst, journals.get(w.instance, []), people, entries, now)
            if run is None:
                continue
            if run.end == "diverged":
                diverged.append(run)
            else:
                runs.append(run)
        if diverged:
            await self._round(diverged)
        return runs

    def _prepare(self, w: Work, inst: Any, journal: list[JournalRow],
                 people: Mapping[str, Any], entries: Mapping[int, dict[str, object]],
                 now: dt.datetime) -> _Run | None:
        if inst is None or inst.live != 1 or inst.status not in ACTIVE:
            return None
        if inst.campaign in self.svc.paused:
            # Its wait stays in the store; resuming the campaign reloads it, and an event
            # wake is held (the cursor stays below it) until the resume has matched again.
            if w.kind == "event":
                self.svc.hold_paused_wake(str(inst.campaign), w)
            return None
        c = self.k.app.campaigns.get(inst.campaign)
        if c is None:
            log.warning("flow.campaign_missing", instance=inst.id, campaign=inst.campaign)
            return None
        pending: object = None
        fix: object = None
        if w.kind == "timer":
            # (a webhook whose call is not final keeps waiting, whatever woke it)
            if inst.status != "waiting" or inst.wake_at is None or unfinished(inst, journal):
                return None
            if inst.wake_at > now:  # fired early (the clock stepped back): armed again
                self.svc.schedule(int(inst.id), inst.wake_at)
                return None
            if inst.wait_event is not None:  # a webhook's outcome is on its journal row
                fix = None if is_webhook_wait(inst.wait_event) else {"value": None}
        elif w.kind == "event":
            if inst.status != "waiting" or not event_wait(inst.wait_event, w.event_name):
                return None
            if w.seq is not None and int(inst.seq) != w.seq:
                return None  # a later wait than the one this event was matched to
            self.svc.cancel_timer(int(inst.id))
            pending = dict(w.event or {})
            fix = {"value": pending}
        elif inst.status != "running":
            return None
        u = people.get(str(inst.user_id))
        attrs: dict[str, object] = dict(u.attributes or {}) if u is not None else {}
        if u is not None and u.email and "email" not in attrs:
            attrs["email"] = u.email
        entry = entries.get(int(inst.entry_event_id)) if inst.entry_event_id else None
        start_data: dict[str, object] = dict(inst.start_data or {})

        def live(key: str) -> tuple[bool, object]:
            if key == "user":
                return True, attrs
            if key.startswith("user."):
                return key[5:] in attrs, attrs.get(key[5:])
            if key == "event":
                return True, entry
            if key == "data":
                return True, start_data
            if key.startswith("data."):
                return key[5:] in start_data, start_data.get(key[5:])
            return False, None

        replay = Replay(c, str(inst.user_id), journal, live)
        run = _Run(int(inst.id), int(inst.seq), c, str(inst.user_id), replay, fix=fix,
                   tz=attrs.get("timezone"), variant=latest_variant(journal))
        try:
            replay.replay()
        except Divergence as d:
            replay.close()
            run.end, run.end_error = "diverged", str(d)
            return run
        if journal and (w.kind == "run" or is_webhook_wait(inst.wait_event)):
            last = journal[-1].result
            run.result = result_for_flow(journal[-1].kind, last)
            run.error = last.get("error") if isinstance(last, dict) else None
        elif w.kind == "event":
            run.result = result_for_flow("wait_for_event", {"value": pending})
        return run

    # -- a round: every instance one command, one transaction ------------------------

    async def _round(self, runs: list[_Run]) -> None:

        limit = work.MAX_COMMANDS_WITHOUT_WAIT  # read at use: tests and operators may set it
        now = self.k.clock.now()
        for r in runs:
            if r.end:
                continue
            try:
                r.cmd = r.replay.resume(r.result, r.error)
            except FlowCrashed as exc:
                r.end, r.end_error = "failed", exc.text
                continue
            except FlowError as exc:
                r.end, r.end_error = "failed", str(exc)
                continue
            except Exception as exc:  # the engine's own fault with this instance: it alone
                r.end, r.end_error = "failed", traceback_text(exc)
                continue
            reads = r.replay.take_reads()
            if r.cmd is None:
                r.end = "completed"
                continue
            r.since_wait += 1
            if r.since_wait > limit:
                r.end = "failed"
                r.end_error = (f"runaway flow: {limit} commands without a wait (the limit); "
                               f"the next was {r.cmd.describe()}")
                continue
            try:
                await self._prepare_step(r, now, reads)
            except FlowError as exc:
                r.end, r.end_error = "failed", str(exc)
            except Exception as exc:
                if is_unavailable(exc):
                    raise  # a condition's store read: nothing of the round was written
                r.end, r.end_error = "failed", traceback_text(exc)
        waits = [r for r in runs if not r.end and r.values.get("wait_event") is not None]
        if not waits:
            await self._commit_round(runs, now)
            return
        # Events stored up to now came before these waits: only a later one wakes them
        # (read before the commit, so an event racing the step counts as later).
        async with self.k.store.connect() as conn:
            after = await max_event_id(conn)
        for r in waits:
            r.values["wait_after"] = after
        # Until the store has been asked for events that raced these steps, the wake
        # cursor stays below them; asked whatever the commit's outcome (a COMMIT reported
        # failed may have applied).
        self.svc.hold_wakes(after + 1)
        try:
            await self._commit_round(runs, now)
        finally:
            self.svc.waits_began([r.iid for r in waits], after + 1)

    async def _commit_round(self, runs: list[_Run], now: dt.datetime) -> None:
        down: Exception | None = None  # the store went away in the middle
        try:
            async with self.k.store.begin() as conn:
                await self._write_all(conn, runs, now)
        except Exception as exc:
            if is_unavailable(exc):
                raise  # nothing of the round was written; the caller knows what to do
            if not isinstance(exc, Lost):
                log.warning("flow.group_retry", steps=len(runs), error=str(exc)[:300])
            for r in runs:  # one transaction each: a lost or bad step fails alone
                r.lost = down is not None
                if r.lost:
                    continue
                try:
                    async with self.k.store.begin() as conn:
                        await self._write(conn, r, now)
                        if r.lost:
                            await conn.rollback()
                except Exception as one:
                    r.lost = True
                    if is_unavailable(one):
                        down = one  # the rest stay as the store has them
                        continue
                    # The store refused this step (a value it cannot hold, say): the
                    # instance fails with the reason rather than stay ``running`` for ever.
                    log.error("flow.step_error", instance=r.iid, error=str(one)[:300])
                    down = await self._fail_alone(r, now, one)
        done = [r for r in runs if not r.lost]
        for r in done:
            self._after(r, now)
        stepped = [r for r in done if not r.end]
        if stepped:
            self.svc.count_steps(len(stepped))
        if any(r.cmd is not None and r.cmd.kind in QUEUEING for r in stepped):
            for waker in self.svc.wakers:
                waker.wake()
        if down is not None:
            raise down

    async def _fail_alone(self, r: _Run, now: dt.datetime, exc: BaseException
                          ) -> Exception | None:
        """Write ``r`` as failed with ``exc`` (its step could not be written); the store
        outage that prevented it, if one did (the round then ends as for any outage)."""
        r.end, r.end_error = "failed", traceback_text(exc)
        try:
            async with self.k.store.begin() as conn:
                await self._write(conn, r, now)
        except Exception as again:
            log.warning("flow.fail_unwritten", instance=r.iid, error=str(again)[:300])
            r.lost = True
            return again if is_unavailable(again) else None
        return None

    async def _prepare_step(self, r: _Run, now: dt.datetime, reads: dict[str, object]
                            ) -> None:
        cmd = r.cmd
        assert cmd is not None
        r.cmd_result, r.cmd_error = None, None
        v: dict[str, object] = {"seq": r.seq + 1, "status": "running", "wake_at": None,
                                "wait_event": None, "wait_after": None, "updated_at": now}
        check_send(self.k.app, cmd)
        if cmd.kind == "condition":
            r.cmd_result, r.cmd_error = await run_condition(self.svc.conditions, cmd,
                                                           r.user_id)
        elif cmd.kind in ("opened", "clicked"):
            r.cmd_result = await engaged(self.k.store, r.user_id, str(cmd.name),
                                         "open" if cmd.kind == "opened" else "click")
        elif cmd.kind == "split":  # decided once per user, journaled (flows.split)
            r.cmd_result = r.variant = await assign(self.k.store, r.campaign.name, r.user_id,
                                                    str(cmd.name), cmd.args, now)
        elif cmd.kind == "wait":
            secs = cmd.args.get("seconds")
            v.update(status="waiting", wake_at=now + dt.timedelta(
                seconds=float(secs) if isinstance(secs, int | float) else 0.0))
        elif cmd.kind == "wait_until":
            v.update(status="waiting", wake_at=dt.datetime.fromisoformat(str(cmd.args["at"])))
        elif cmd.kind == "wait_until_local":  # decided now, journaled (flows.localwait)
            wake, v["_journal"] = plan_local_wait(self.k, cmd, r.tz, now)
            v.update(status="waiting", wake_at=wake)
        elif cmd.kind == "wait_for_event":
            # known before the wait commits, so no event slips between commit and here
            self.svc.awaited.add(str(cmd.name))
            t = cmd.args.get("timeout")
            v.update(status="waiting", wait_event=cmd.name, wake_at=None if not isinstance(
                t, int | float) else now + dt.timedelta(seconds=float(t)))
        elif cmd.kind == "webhook":  # woken when its call is final (flows.webhookwait)
            v.update(status="waiting", wait_event=marker(r.iid, r.seq))
        elif cmd.kind == "exit":
            v.update(status="exited", live=None, ended_at=now)
        elif cmd.kind == "continue_as_new":
            v.update(status="completed", live=None, ended_at=now)
            v["_continue"] = dict(cmd.args)
        v["_reads"] = reads
        r.values = v

    async def _write_all(self, conn: AsyncConnection, runs: list[_Run], now: dt.datetime
                         ) -> None:
        """The fast path: the round's steps as a few statements (instance updates grouped
        by the state they set, multi-row inserts for journal rows and sends)."""
        updates: list[dict[str, object]] = []
        rows: list[dict[str, object]] = []
        for r in runs:
            p: dict[str, object] = {"b_id": r.iid, "b_seq": r.seq, "n_error": None,
                                    "n_updated": now, "n_ended": None, "n_live": 1,
                                    "n_wake": None, "n_event": None, "n_after": None}
            if r.end:
                keep = r.end == "diverged"
                p.update(n_seq=r.seq, n_status=r.end, n_error=r.end_error,
                         n_live=1 if keep else None, n_ended=None if keep else now)
            else:
                v = r.values
                p.update(n_seq=v["seq"], n_status=v["status"], n_wake=v["wake_at"],
                         n_event=v["wait_event"], n_after=v.get("wait_after"),
                         n_live=v.get("live", 1),
                         n_ended=v.get("ended_at"))
                cmd = r.cmd
                assert cmd is not None
                stored = v.get("_journal") if cmd.kind in WAIT_KINDS else (
                    {"error": r.cmd_error} if r.cmd_error is not None
                    else {"value": r.cmd_result})
                rows.append({"instance_id": r.iid, "seq": r.seq, "kind": cmd.kind,
                             "name": cmd.name, "args_hash": cmd.hash, "result": stored,
                             "reads": v.get("_reads") or None, "created_at": now})
            updates.append(p)
        await update_instances(conn, updates)
        for r in runs:
            if r.fix is not None:
                await conn.execute(sa.update(flow_journal).where(
                    flow_journal.c.instance_id == r.iid, flow_journal.c.seq == r.seq - 1
                ).values(result=r.fix))
        if rows:
            await conn.execute(sa.insert(flow_journal), rows)
        for r in runs:
            if not r.end and "_continue" in r.values:
                await self._continue(conn, r, now)
        sends = queued_by(runs)
        if sends:
            # No look-up first: a step's key is new unless its seq was taken, and then the
            # update above matched nothing. Should one exist anyway, the unique key refuses
            # it and the round is retried step by step, where enqueue skips it.
            await outbox.enqueue_many(conn, sends, now=now, look_up=False)
        for r in runs:
            r.lost = False

    async def _write(self, conn: AsyncConnection, r: _Run, now: dt.datetime) -> None:
        fi = flow_instances.c
        if r.end:
            keep = r.end == "diverged"
            res = await conn.execute(sa.update(flow_instances).where(
                fi.id == r.iid, fi.seq == r.seq, fi.live == 1, fi.status.in_(ACTIVE)).values(
                status=r.end, live=1 if keep else None, wake_at=None, wait_event=None,
                wait_after=None, error=r.end_error, updated_at=now, ended_at=None if keep else now))
            r.lost = res.rowcount != 1
            if not r.lost and r.fix is not None:
                await conn.execute(sa.update(flow_journal).where(
                    flow_journal.c.instance_id == r.iid, flow_journal.c.seq == r.seq - 1
                ).values(result=r.fix))
            return
        cmd = r.cmd
        assert cmd is not None
        values = {k: v for k, v in r.values.items() if not k.startswith("_")}
        res = await conn.execute(sa.update(flow_instances).where(
            fi.id == r.iid, fi.seq == r.seq, fi.live == 1, fi.status.in_(ACTIVE)
        ).values(**values))
        r.lost = res.rowcount != 1
        if r.lost:
            return
        if r.fix is not None:
            await conn.execute(sa.update(flow_journal).where(
                flow_journal.c.instance_id == r.iid, flow_journal.c.seq == r.seq - 1
            ).values(result=r.fix))
        stored = r.values.get("_journal") if cmd.kind in WAIT_KINDS else (
            {"error": r.cmd_error} if r.cmd_error is not None else {"value": r.cmd_result})
        await conn.execute(sa.insert(flow_journal).values(
            instance_id=r.iid, seq=r.seq, kind=cmd.kind, name=cmd.name, args_hash=cmd.hash,
            result=stored, reads=r.values.get("_reads") or None, created_at=now))
        if cmd.kind == "continue_as_new":
            await self._continue(conn, r, now)
        # Looked up first: this step alone, retried after its round's transaction failed.
        await outbox.enqueue_many(conn, queued_by([r]), now=now)

    async def _continue(self, conn: AsyncConnection, r: _Run, now: dt.datetime) -> None:
        """continue_as_new: the new instance, in the step's transaction (the old one's
        update, which ends it, came first: one live instance per campaign and user)."""
        res = await conn.execute(sa.insert(flow_instances).values(
            campaign=r.campaign.name, user_id=r.user_id, version=r.campaign.version,
            status="running", live=1, seq=0, start_data=r.values["_continue"],
            created_at=now, updated_at=now))
        r.values["_continued_as"] = int(res.inserted_primary_key[0])  # type: ignore[index]

    def _after(self, r: _Run, now: dt.datetime) -> None:
        """Effects outside the store, once the round committed."""
        svc, bus, name = self.svc, self.k.bus, r.campaign.name
        if r.end:
            svc.ended(r.iid, name, r.user_id, r.end, r.end_error)
            return
        cmd = r.cmd
        assert cmd is not None
        wake_at = r.values.get("wake_at")
        if isinstance(wake_at, dt.datetime):
            svc.schedule(r.iid, wake_at)
        log.debug("flow.step", campaign=name, user_id=r.user_id, instance=r.iid, seq=r.seq,
                  command=cmd.kind, name=cmd.name)
        bus.publish("flow.step", campaign=name, user_id=r.user_id, instance=r.iid,
                    seq=r.seq, command=cmd.kind, name=cmd.name)
        new = r.values.get("_continued_as")
        if cmd.kind == "continue_as_new" and isinstance(new, int):
            log.info("flow.continued", campaign=name, user_id=r.user_id, instance=r.iid,
                     new_instance=new)
            bus.publish("flow.continued", campaign=name, user_id=r.user_id, instance=r.iid,
                        new_instance=new)
            svc.start_run(new)
        if cmd.kind == "exit":
            log.info("flow.exited", campaign=name, user_id=r.user_id, instance=r.iid)
            bus.publish("flow.exited", campaign=name, user_id=r.user_id, instance=r.iid,
                        reason="exit()")
