"""The flow service's control actions: pause and resume a campaign, terminate, restart
and wake an instance (``campaign.pause``, ``campaign.resume``, ``instance.terminate``,
``instance.restart``, ``instance.wake`` on the control socket).

Pausing writes the campaign's hold marker and resuming lets in the entries it held
(:mod:`.held`). Waking an instance is its timer firing brought forward: its ``wake_at``
becomes now in the store (conditional on the wait it was asked about) and the timer
path steps it, so the wait resolves as a timeout would (``None`` for a
``wait_for_event``) and is journaled as one; a crash before the step leaves a due wait
that the loader fires at start. A ``wait_for_event`` with no timeout is not woken: its
flow never expects ``None``.

A mixin of :class:`~segflowd.flows.service.FlowService`, which owns the state it reads.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError

from ..app import CampaignDef
from ..errors import FlowError
from ..ingest.users import TOMBSTONE_PREFIX
from ..schema import campaign_settings, flow_instances
from ..store import is_unavailable
from .wheel import TimerWheel
from .work import Work, secs

if TYPE_CHECKING:
    from ..kernel import Kernel

__all__ = ["Admin"]

log = structlog.get_logger("segflowd.flows")

_ENDED = ("completed", "exited", "terminated")  # no action brings these back


class Admin:
    """The control actions; see the module docstring."""

    k: Kernel
    wheel: TimerWheel
    paused: set[str]
    _loaded_until: dt.datetime | None
    _kick: anyio.Event

    if TYPE_CHECKING:
        def _push(self, work: Work) -> None: ...

        def _cancel_timer(self, iid: int, wake_at: dt.datetime | None) -> None: ...

        def _running_query(self, campaign: str | None = None) -> sa.Select[Any]: ...

        async def _match_campaign(self, campaign: str) -> int: ...

        def _release_paused(self, campaign: str) -> None: ...

        async def _mark_held(self, conn: Any, c: CampaignDef) -> None: ...

        async def _release_held(self, c: CampaignDef) -> int: ...

        async def _count_waiting(self) -> None: ...

        def _store_failed(self, exc: BaseException) -> None: ...

    def _campaign_arg(self, args: Mapping[str, object]) -> str:
        name = args.get("campaign")
        if not isinstance(name, str) or name not in self.k.app.campaigns:
            raise FlowError(f"no campaign {name!r}; campaigns: "
                            f"{', '.join(sorted(self.k.app.campaigns)) or '(none)'}")
        return name

    async def _set_paused(self, name: str, paused: bool) -> None:
        now = self.k.clock.now()
        async with self.k.store.begin() as conn:
            res = await conn.execute(sa.update(campaign_settings).where(
                campaign_settings.c.campaign == name).values(paused=paused, updated_at=now))
            if res.rowcount == 0:
                await conn.execute(sa.insert(campaign_settings).values(
                    campaign=name, paused=paused, updated_at=now))
            if paused:  # with the flag, so a paused campaign always holds from here
                await self._mark_held(conn, self.k.app.campaigns[name])

    async def _act_pause(self, args: Mapping[str, object]) -> object:
        """campaign.pause {"campaign"}: no new entries, no steps; waits are kept."""
        name = self._campaign_arg(args)
        await self._set_paused(name, True)
        self.paused.add(name)
        log.info("campaign.paused", campaign=name)
        self.k.bus.publish("campaign.paused", campaign=name)
        try:
            await self._count_waiting()
        except Exception as exc:  # only a statistic: the pause is committed; recounted later
            log.warning("flow.recount_failed", error=str(exc)[:300])
        return {"campaign": name, "paused": True}

    async def _act_resume(self, args: Mapping[str, object]) -> object:
        """campaign.resume {"campaign"}: steps run again; waits due meanwhile fire now."""
        name = self._campaign_arg(args)
        await self._set_paused(name, False)
        self.paused.discard(name)
        fi = flow_instances.c
        async with self.k.store.connect() as conn:
            if self._loaded_until is not None:
                rows = await conn.execute(sa.select(fi.id, fi.wake_at).where(
                    fi.campaign == name, fi.wake_at.is_not(None),
                    fi.wake_at < self._loaded_until))
                for iid, wake_at in rows:
                    self.wheel.add(int(iid), secs(wake_at))
            for (iid,) in await conn.execute(self._running_query(name)):
                self._push(Work(int(iid), "run"))
        # The stepper dropped the wakes of events that came while the campaign was paused;
        # the store still has the events: match its waits against them.
        await self._match_campaign(name)
        self._release_paused(name)  # the wakes just matched hold the cursor now
        self._kick.set()
        try:
            entered = await self._release_held(self.k.app.campaigns[name])
        except Exception as exc:
            if is_unavailable(exc):  # resumed; the resync lets the held in once it is back
                self._store_failed(exc)
            raise
        log.info("campaign.resumed", campaign=name, held_entered=entered)
        self.k.bus.publish("campaign.resumed", campaign=name, held_entered=entered)
        return {"campaign": name, "paused": False, "held_entered": entered}

    async def _instance_arg(self, args: Mapping[str, object]) -> Any:
        raw = args.get("instance")
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise FlowError(f"instance must be an instance id, not {raw!r}")
        try:
            iid = int(raw)
        except ValueError:
            raise FlowError(f"instance must be an instance id, not {raw!r}") from None
        async with self.k.store.connect() as conn:
            row = (await conn.execute(sa.select(flow_instances).where(
                flow_instances.c.id == iid))).first()
        if row is None:
            raise FlowError(f"no flow instance {iid}")
        return row

    async def _act_terminate(self, args: Mapping[str, object]) -> object:
        """instance.terminate {"instance"}: end it for good (diverged, failed or live)."""
        inst = await self._instance_arg(args)
        now = self.k.clock.now()
        if inst.status in _ENDED:
            raise FlowError(f"instance {inst.id} already ended ({inst.status})")
        fi = flow_instances.c
        async with self.k.store.begin() as conn:
            # Conditional: the instance may have ended since it was read.
            done = await conn.execute(sa.update(flow_instances).where(
                fi.id == inst.id, fi.status.not_in(_ENDED)).values(
                status="terminated", live=None, wake_at=None, wait_event=None,
                wait_after=None, ended_at=now, updated_at=now))
        if done.rowcount != 1:
            raise FlowError(f"instance {inst.id} ended meanwhile; nothing was terminated")
        self._cancel_timer(int(inst.id), inst.wake_at)
        log.info("flow.terminated", campaign=inst.campaign, instance=inst.id)
        self.k.bus.publish("flow.terminated", campaign=inst.campaign, user_id=inst.user_id,
                           instance=inst.id)
        return {"instance": inst.id, "status": "terminated"}

    async def _act_restart(self, args: Mapping[str, object]) -> object:
        """instance.restart {"instance"}: a diverged or failed instance starts over, on the
        current version, as a new instance."""
        inst = await self._instance_arg(args)
        if inst.status not in ("diverged", "failed"):
            raise FlowError(f"instance {inst.id} is {inst.status}: only diverged or failed "
                            "instances can be restarted")
        if str(inst.user_id).startswith(TOMBSTONE_PREFIX):
            raise FlowError(f"instance {inst.id} belongs to a forgotten user: it cannot be "
                            "restarted")
        c = self.k.app.campaigns.get(inst.campaign)
        if c is None:
            raise FlowError(f"campaign {inst.campaign!r} is no longer in the app")
        now = self.k.clock.now()
        fi = flow_instances.c
        try:
            async with self.k.store.begin() as conn:
                await conn.execute(sa.update(flow_instances).where(fi.id == inst.id).values(
                    status="terminated" if inst.status == "diverged" else inst.status,
                    live=None, ended_at=inst.ended_at or now, updated_at=now))
                res = await conn.execute(sa.insert(flow_instances).values(
                    campaign=c.name, user_id=inst.user_id, version=c.version,
                    status="running", live=1, seq=0, entry_event_id=inst.entry_event_id,
                    start_data=inst.start_data, created_at=now, updated_at=now))
                new = int(res.inserted_primary_key[0])  # type: ignore[index]  # always set
        except IntegrityError:
            raise FlowError(f"user {inst.user_id!r} already has a live instance of "
                            f"{c.name!r}") from None
        log.info("flow.restarted", campaign=c.name, instance=inst.id, new_instance=new)
        self.k.bus.publish("flow.started", campaign=c.name, user_id=inst.user_id,
                           instance=new, restarted_from=inst.id)
        self._push(Work(new, "run"))
        return {"instance": new, "restarted_from": inst.id}

    async def _act_wake(self, args: Mapping[str, object]) -> object:
        """instance.wake {"instance"}: fire a waiting instance's wait now, as its timer
        would (a ``wait_for_event`` gets ``None``, as on its timeout)."""
        inst = await self._instance_arg(args)
        if inst.status != "waiting" or inst.live != 1:
            raise FlowError(f"instance {inst.id} is {inst.status}, not waiting: there is "
                            "no wait to wake")
        if inst.campaign in self.paused:
            raise FlowError(f"instance {inst.id}: campaign {inst.campaign!r} is paused; "
                            "resume it first")
        if inst.campaign not in self.k.app.campaigns:
            raise FlowError(f"campaign {inst.campaign!r} is no longer in the app")
        if inst.wake_at is None:  # its flow was promised the event, never a None
            raise FlowError(f"instance {inst.id} waits for event {inst.wait_event!r} with "
                            "no timeout: there is no timer to bring forward")
        now = self.k.clock.now()
        fi = flow_instances.c
        async with self.k.store.begin() as conn:
            # Conditional on the wait that was read: a step may have moved it on since.
            done = await conn.execute(sa.update(flow_instances).where(
                fi.id == inst.id, fi.seq == inst.seq, fi.status == "waiting",
                fi.live == 1).values(wake_at=now, updated_at=now))
        if done.rowcount != 1:
            raise FlowError(f"instance {inst.id} moved on meanwhile; nothing was woken")
        self._cancel_timer(int(inst.id), inst.wake_at)
        self._push(Work(int(inst.id), "timer"))
        wait = f"event {inst.wait_event}" if inst.wait_event is not None else "timer"
        log.info("flow.woken", campaign=inst.campaign, instance=inst.id, wait=wait)
        self.k.bus.publish("flow.woken", campaign=inst.campaign, user_id=inst.user_id,
                           instance=inst.id)
        return {"instance": inst.id, "woken": True, "wait": wait}
