"""Broadcasts: a one-off send of a template (or start of a flow) to a segment's members.

An audience segment is a segment, so a broadcast to a data source's audience names its
audience segment. What a caller may rely on:

* **Never twice**: each user's message is enqueued with ``dedupe_key``
  ``bc:<broadcast id>:<user id>`` in the same transaction that advances the broadcast's
  cursor, so a retried batch or a restart cannot queue a second one.
* **Resumable**: members are taken in user-id order after ``broadcasts.after``; at start
  every broadcast still ``running`` continues from there.
* **Rate-limited**: at most ``rate`` users per second (measured on the injected clock).
* **Transient store errors are retried**: a batch the store refused for a reason that
  passes (a deadlock, a lock wait timeout, a dropped connection, the server down) is
  tried again after a backoff from ``RETRY_FIRST`` doubling to ``RETRY_MAX`` seconds.
  ``failed`` is kept for errors a retry would not cure; its ``error`` says which.
* **Paused campaigns**: a broadcast that starts a paused campaign is refused at launch.
  If the campaign is paused while its broadcast runs, the broadcast holds (still
  ``running``; nobody is counted done or skipped) and goes on once the campaign resumes,
  across a restart too.
* **Picked audiences** (pick-and-send): ``broadcast.launch`` with ``data_source`` and
  ``values`` instead of ``segment`` first syncs that audience (the ``audiences.pick``
  action of the audience service) under its generated segment name, then broadcasts
  to its members in ``audience_members``; with ``dry_run`` it only reports the
  audience's size and a sample. The broadcast row names the generated segment, so a
  restart resumes it like any other.
* **Topics**: ``topic`` names an app topic (``app.topic()``); its messages carry it, and
  a user unsubscribed from it (or from all marketing) is not sent them. A broadcast that
  starts a campaign has the campaign's topic.
* **Progress** goes to the live bus as ``broadcast.progress`` (``done``/``total``), then
  ``broadcast.completed`` or ``broadcast.failed``; ``broadcast.held`` and
  ``broadcast.released`` mark a hold.

Starting a flow goes through :class:`FlowStarter`, which the flow engine implements.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence, Set
from typing import TYPE_CHECKING, Literal, Protocol

import anyio
import sqlalchemy as sa
import structlog
from anyio.abc import TaskGroup, TaskStatus

from ..delivery.outbox import Queued, enqueue_many
from ..errors import SegflowError
from ..hooks import OutboxWaker
from ..schema import audience_members, broadcasts, segment_members
from ..store import is_unavailable
from ..userlocks import existing_users
from .picked import parse_name

if TYPE_CHECKING:
    from ..http import Router
    from ..kernel import Kernel

__all__ = ["BroadcastError", "BroadcastService", "BroadcastStatistics", "FlowStart",
           "FlowStarter"]

log = structlog.get_logger("segflowd.broadcasts")

DEFAULT_RATE = 50.0  # users per second
MAX_RATE = 10_000.0  # users per second
BATCH_SECONDS = 1.0  # a batch holds about this many seconds of the rate
MAX_BATCH = 500  # users per store transaction, at most
RETRY_FIRST = 1.0  # seconds before retrying a batch the store failed transiently
RETRY_MAX = 30.0  # seconds between retries, at most (the backoff doubles up to it)
HOLD_POLL = 1.0  # seconds between looks at the paused campaign of a held broadcast


class BroadcastError(SegflowError, ValueError):
    """A broadcast cannot be launched as asked (unknown template or segment, bad rate)."""


FlowStart = Literal["started", "exists", "paused"]


class FlowStarter(Protocol):
    """Starts a campaign's flow for one user, once per ``key`` (the flow engine's part)."""

    @property
    def paused(self) -> Set[str]:
        """The campaigns paused now: they start nobody."""
        ...

    async def start_flow(self, campaign: str, user_id: str, *, key: str,
                         data: Mapping[str, object]) -> FlowStart:
        """``"started"``; ``"exists"`` when an instance for ``key`` was started before or
        the user has a live one (nothing to do, for good); ``"paused"`` when the campaign
        is paused (nothing was done; the same call after a resume starts it)."""
        ...


@dataclasses.dataclass(frozen=True)
class BroadcastStatistics:
    running: int
    launched: int
    completed: int
    users_done: int
    held: int  # broadcasts waiting for their paused campaign
    retries: int  # batches tried again after a transient store error


class BroadcastService:
    """Runs broadcasts (a daemon Service); ``launch`` is also the ``broadcast.launch`` action."""

    name = "broadcasts"

    def __init__(self, k: Kernel, *, wakers: Sequence[OutboxWaker] = (),
                 flows: FlowStarter | None = None) -> None:
        self.k = k
        self.wakers = wakers
        self.flows = flows
        self._tg: TaskGroup | None = None
        self._running: set[int] = set()
        self._launched = 0
        self._completed = 0
        self._users = 0
        self._held: set[int] = set()
        self._retries = 0
        k.actions["broadcast.launch"] = self._action_launch
        k.stats["broadcasts"] = self.statistics

    # -- service -----------------------------------------------------------------------

    def register_routes(self, router: Router) -> None:
        return None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            b = broadcasts.c
            async with self.k.store.connect() as conn:
                ids = [int(r[0]) for r in await conn.execute(
                    sa.select(b.id).where(b.status == "running").order_by(b.id))]
            for bid in ids:
                log.info("broadcast.resumed", broadcast=bid)
                self._start(bid)
            task_status.started()
            await anyio.sleep_forever()

    async def drain(self) -> None:
        # Stopping mid-broadcast is safe: the cursor is committed with each batch.
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # -- launching ---------------------------------------------------------------------

    async def launch(self, *, segment: str, template: str | None = None,
                     campaign: str | None = None, data: Mapping[str, object] | None = None,
                     rate: float = DEFAULT_RATE, name: str | None = None,
                     topic: str | None = None) -> int:
        """Create a broadcast and start it; its id. BroadcastError for a bad request.
        ``topic`` (an app topic) is what its messages' users can opt out of; a campaign's
        broadcast has its campaign's."""
        self._check_target(template, campaign)
        topic = self._topic(campaign, topic)
        picked = self._is_picked(segment)
        if not picked and segment not in self.k.app.segments:
            known = ", ".join(sorted(self.k.app.segments)) or "none"
            hint = "; or pick a data source's audience: data_source and values " \
                "(segflowd broadcast --data-source NAME --values KEY=VALUE)" \
                if self.k.app.data_sources else ""
            raise BroadcastError(f"unknown segment {segment!r} (segments: {known}){hint}")
        if not 0 < rate <= MAX_RATE:
            raise BroadcastError(f"rate must be between 0 and {MAX_RATE:g} users per second")
        now = self.k.clock.now()
        table, key_col, _ = _members(picked)
        async with self.k.store.begin() as conn:
            total = (await conn.execute(sa.select(sa.func.count()).select_from(
                table).where(key_col == segment))).scalar_one()
            result = await conn.execute(sa.insert(broadcasts).values(
                name=name, template=template, campaign=campaign, segment=segment,
                data=dict(data or {}),
                rate=float(rate), status="running", after=None, total=int(total), done=0,
                created_at=now, updated_at=now, topic=topic))
            key = result.inserted_primary_key
            assert key is not None  # an INSERT of one row always has its key
            bid = int(key[0])
        self._launched += 1
        log.info("broadcast.launched", broadcast=bid, segment=segment, template=template,
                 campaign=campaign, total=total, rate=rate)
        self.k.bus.publish("broadcast.launched", broadcast=bid, segment=segment,
                           template=template, campaign=campaign, total=int(total))
        self._start(bid)
        return bid

    def _is_picked(self, segment: str) -> bool:
        """Whether ``segment`` is a picked audience's generated name (not an app segment)."""
        return segment not in self.k.app.segments and \
            parse_name(segment, self.k.app.data_sources) is not None

    def _check_target(self, template: str | None, campaign: str | None) -> None:
        app = self.k.app
        if (template is None) == (campaign is None):
            raise BroadcastError("a broadcast sends a template or starts a campaign: "
                                 "give exactly one of template and campaign")
        if (template is not None and template not in app.templates
                and template not in app.sms_templates):
            known = ", ".join(sorted([*app.templates, *app.sms_templates])) or "none"
            raise BroadcastError(f"unknown template {template!r} (templates: {known})")
        if campaign is not None:
            if campaign not in app.campaigns:
                known = ", ".join(sorted(app.campaigns)) or "none"
                raise BroadcastError(f"unknown campaign {campaign!r} (campaigns: {known})")
            if self.flows is None:
                raise BroadcastError("this daemon's flow engine cannot start flows for "
                                     "broadcasts; send a template instead")
            if campaign in self.flows.paused:
                raise BroadcastError(
                    f"campaign {campaign!r} is paused, so the broadcast would start nobody: "
                    f"resume it first (segflowd resume {campaign})")

    def _topic(self, campaign: str | None, topic: str | None) -> str | None:
        topics = self.k.app.topics
        if campaign is not None:
            own = self.k.app.campaigns[campaign].topic
            if topic is not None and topic != own:
                raise BroadcastError(f"a broadcast of campaign {campaign!r} has its "
                                     f"campaign's topic ({own or 'none'}), not {topic!r}")
            return own
        if topic is not None and topic not in topics:
            raise BroadcastError(f"unknown topic {topic!r} (topics: "
                                 f"{', '.join(sorted(topics)) or 'none'}; app.topic() adds one)")
        return topic

    async def _action_launch(self, args: Mapping[str, object]) -> object:
        """``broadcast.launch``: segment, template or campaign, and optional rate, data,
        topic and broadcast (a label). Values may come as text (``--arg rate=20``)."""
        data = args.get("data") or {}
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError:
                raise BroadcastError("data must be a JSON object") from None
        if not isinstance(data, Mapping):
            raise BroadcastError("data must be a JSON object")
        raw_rate = args.get("rate", DEFAULT_RATE)
        try:
            if isinstance(raw_rate, bool):
                raise ValueError
            rate = float(raw_rate)  # type: ignore[arg-type]  # a number or its text
        except (TypeError, ValueError):
            raise BroadcastError("rate must be a number of users per second") from None
        template, campaign = args.get("template"), args.get("campaign")
        template = None if template is None else str(template)
        campaign = None if campaign is None else str(campaign)
        segment = args.get("segment")
        if args.get("data_source") is not None:
            if segment is not None:
                raise BroadcastError("give a segment or a data_source (with values), "
                                     "not both")
            self._check_target(template, campaign)
            picked = await self._pick(args)
            if args.get("dry_run"):
                return {**picked, "dry_run": True, "template": template,
                        "campaign": campaign}
            segment = picked["segment"]
        elif args.get("dry_run"):
            raise BroadcastError("dry_run previews a data source's audience: give "
                                 "data_source and values")
        if not isinstance(segment, str):
            raise BroadcastError("segment is required: the segment (or audience segment) "
                                 "to broadcast to, or a data_source and its values")
        label, topic = args.get("broadcast", args.get("name")), args.get("topic")
        bid = await self.launch(
            segment=segment, template=template, campaign=campaign, data=dict(data),
            rate=rate, name=None if label is None else str(label)[:191],
            topic=None if topic is None else str(topic))
        return await self.status(bid)

    async def _pick(self, args: Mapping[str, object]) -> dict[str, object]:
        """The audience service's ``audiences.pick`` for these arguments: a dry run's
        preview, or the pick synced now (its reply names the generated segment)."""
        pick = self.k.actions.get("audiences.pick")
        if pick is None:
            raise BroadcastError("this daemon has no data sources to pick an audience from")
        reply = await pick({"data_source": args.get("data_source"),
                            "values": args.get("values", {}),
                            "dry_run": bool(args.get("dry_run"))})
        assert isinstance(reply, dict)  # audiences.pick answers an object
        return reply

    async def status(self, broadcast_id: int) -> dict[str, object]:
        """The broadcast's row as JSON-able values."""
        async with self.k.store.connect() as conn:
            row = (await conn.execute(sa.select(broadcasts).where(
                broadcasts.c.id == broadcast_id))).mappings().first()
        if row is None:
            raise BroadcastError(f"no broadcast {broadcast_id}")
        return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}

    def _start(self, bid: int) -> None:
        if self._tg is None or bid in self._running:
            return  # not running yet: run() resumes it from the store
        self._running.add(bid)
        self._tg.start_soon(self._run_one, bid)

    # -- running -----------------------------------------------------------------------

    async def _run_one(self, bid: int) -> None:
        retry = RETRY_FIRST
        try:
            while True:
                try:
                    pause = await self.step(bid)
                except Exception as exc:
                    if not is_unavailable(exc):
                        await self._fail(bid, exc)
                        return
                    # A deadlock, a lock wait timeout, a dropped connection: the batch was
                    # rolled back with its cursor, so trying it again sends nobody twice.
                    self._retries += 1
                    log.warning("broadcast.store_unavailable", broadcast=bid,
                                error=_short(exc), retry_in_s=retry)
                    await self.k.clock.sleep(retry)
                    retry = min(retry * 2, RETRY_MAX)
                    continue
                retry = RETRY_FIRST
                if pause is None:
                    return
                if pause > 0:
                    await self.k.clock.sleep(pause)
        finally:
            self._running.discard(bid)
            self._held.discard(bid)

    async def _fail(self, bid: int, exc: Exception) -> None:
        """Record a failure no retry would cure, retrying only the record itself."""
        if not isinstance(exc, SegflowError):
            log.error("broadcast.error", broadcast=bid, exc_info=exc)
        retry = RETRY_FIRST
        while True:
            try:
                await self._finish(bid, "failed", _short(exc))
                return
            except Exception as again:
                if not is_unavailable(again):
                    raise
                await self.k.clock.sleep(retry)
                retry = min(retry * 2, RETRY_MAX)

    async def step(self, bid: int) -> float | None:
        """Handle the next batch of broadcast ``bid``.

        Returns the seconds to wait before the next batch (the rate limit, or
        :data:`HOLD_POLL` while its campaign is paused), or None once the broadcast is
        finished. A store error propagates; nothing after the last commit counts as done."""
        b = broadcasts.c
        clock = self.k.clock
        started = clock.monotonic()
        async with self.k.store.connect() as conn:
            row = (await conn.execute(sa.select(broadcasts).where(b.id == bid))).first()
            if row is None or row.status != "running":
                return None
            if row.campaign is not None:
                if self.flows is None:
                    raise BroadcastError(f"broadcast {bid} starts campaign {row.campaign!r} "
                                         "but this daemon's flow engine cannot start flows")
                if row.campaign in self.flows.paused:
                    self._hold(bid, row.campaign)
                    return HOLD_POLL
            size = max(1, min(MAX_BATCH, int(row.rate * BATCH_SECONDS)))
            _, key_col, user_col = _members(self._is_picked(row.segment))
            q = sa.select(user_col).where(key_col == row.segment)
            if row.after is not None:
                q = q.where(user_col > row.after)
            user_ids = [r[0] for r in await conn.execute(q.order_by(user_col).limit(size))]
        paused = False
        if user_ids and row.campaign is not None and self.flows is not None:
            # Outside the store transaction: the flow engine commits its own, and
            # starts once per key, so a batch retried after a crash starts nobody twice.
            handled = 0
            for uid in user_ids:
                outcome = await self.flows.start_flow(
                    row.campaign, uid, key=f"bc:{bid}:{uid}", data=dict(row.data or {}))
                if outcome == "paused":  # paused mid-batch: the rest wait for the resume
                    paused = True
                    break
                handled += 1  # started, or it had been ("exists"): this user is done
            user_ids = user_ids[:handled]
            if not user_ids:
                self._hold(bid, row.campaign)
                return HOLD_POLL
        self._release(bid, row.campaign)
        done = int(row.done) + len(user_ids)
        if user_ids:
            async with self.k.store.begin() as conn:
                # A user forgotten since the batch was read is left out, and never named
                # as the cursor: the next batch starts after the last one still there
                # (the same next member, as the forget's own step-back gives).
                there = await existing_users(conn, user_ids)
                if row.template is not None:
                    sms = row.template in self.k.app.sms_templates  # an SMS broadcast
                    await enqueue_many(conn, [
                        Queued(kind="broadcast", template=row.template, user_id=uid,
                               dedupe_key=f"bc:{bid}:{uid}", data=dict(row.data or {}),
                               channel="sms" if sms else "email", topic=row.topic)
                        for uid in user_ids if uid in there], now=clock.now())
                kept = [u for u in user_ids if u in there]
                await conn.execute(sa.update(broadcasts).where(b.id == bid).values(
                    after=kept[-1] if kept else row.after, done=done,
                    updated_at=clock.now()))
        if not user_ids:
            await self._finish(bid, "completed", None)
            return None
        self._users += len(user_ids)
        if row.template is not None:
            for w in self.wakers:
                w.wake()
        self.k.bus.publish("broadcast.progress", broadcast=bid, done=done,
                           total=int(row.total), segment=row.segment)
        if paused:
            assert row.campaign is not None  # only a campaign's start says "paused"
            self._hold(bid, row.campaign)
            return HOLD_POLL
        # At most `rate` users per second: a batch of n takes at least n / rate seconds.
        return max(0.0, len(user_ids) / float(row.rate) - (clock.monotonic() - started))

    def _hold(self, bid: int, campaign: str) -> None:
        if bid not in self._held:
            self._held.add(bid)
            log.info("broadcast.held", broadcast=bid, campaign=campaign,
                     reason="campaign paused")
            self.k.bus.publish("broadcast.held", broadcast=bid, campaign=campaign)

    def _release(self, bid: int, campaign: str | None) -> None:
        if bid in self._held:
            self._held.discard(bid)
            log.info("broadcast.released", broadcast=bid, campaign=campaign)
            self.k.bus.publish("broadcast.released", broadcast=bid, campaign=campaign)

    async def _finish(self, bid: int, status: str, error: str | None) -> None:
        now = self.k.clock.now()
        async with self.k.store.begin() as conn:
            await conn.execute(sa.update(broadcasts).where(broadcasts.c.id == bid).values(
                status=status, error=error, finished_at=now, updated_at=now))
        if status == "completed":
            self._completed += 1
            log.info("broadcast.completed", broadcast=bid)
        else:
            log.warning("broadcast.failed", broadcast=bid, error=error)
        self.k.bus.publish(f"broadcast.{status}", broadcast=bid, error=error)

    def statistics(self) -> BroadcastStatistics:
        return BroadcastStatistics(running=len(self._running), launched=self._launched,
                                   completed=self._completed, users_done=self._users,
                                   held=len(self._held), retries=self._retries)


def _members(picked: bool) -> tuple[sa.Table, sa.Column[str], sa.Column[str]]:
    """Where a broadcast's members are: a picked audience's in ``audience_members`` (the
    segment engine does not evaluate it), any other segment's in ``segment_members``."""
    if picked:
        return audience_members, audience_members.c.audience, audience_members.c.user_id
    return segment_members, segment_members.c.segment, segment_members.c.user_id


def _short(exc: BaseException) -> str:
    """The error's first line (the driver's message, without SQLAlchemy's statement)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return text.split("\n", 1)[0][:300] or type(exc).__name__
