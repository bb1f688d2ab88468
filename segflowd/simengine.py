"""The engine behind :class:`segflowd.simulation.Simulation`: the daemon's real engines on
a temporary store, stepped through virtual time.

The parts are the ones :func:`segflowd.daemon.build_services` wires (ingest's group
committer and routes, the segment engine, transactions, flows with their timer wheel,
delivery's claim-render-record path and tracking routes); what differs is who moves
time and who waits for whom:

* Time is a :class:`VirtualClock` that moves only in :meth:`SimEngine.advance`, from one
  moment something is due (a wait, a segment refresh) straight to the next; sleepers whose
  deadline passes are woken at that moment. Nothing sleeps on the wall clock.
* The flow service runs its own tasks (workers, ticker); the segment engine, transactions
  (goals) and delivery are stepped by :meth:`SimEngine.settle` until nothing is left at the
  current moment, so each moment is finished before time moves on.
* Segments are refreshed at their due times by :class:`~segflowd.simrefresh.RefreshSchedule`,
  which first asks the store whether the refresh would change anything.
* The store's statements run on the event loop's own thread (:mod:`segflowd.simstore`).
* ``rt.webhook`` calls are real HTTP calls (``[webhooks] allow`` applies), stepped with
  delivery; their retries wait in virtual time.
* Delivery's providers are :class:`~segflowd.simproviders.MemoryProvider` and
  :class:`~segflowd.simproviders.MemorySmsProvider` (messages kept in memory);
  ``rt.condition`` is answered by the callables in ``SimEngine.answers``
  (:meth:`Simulation.source <segflowd.simulation.Simulation.source>`), else
  by the configured source itself.
* Users, events, opens and clicks go through the HTTP routes (the ASGI router called
  in-process), so they are validated and committed exactly as a client's would be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import heapq
import itertools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import anyio.lowlevel
import sqlalchemy as sa
from anyio.abc import TaskStatus

from .app import Segflow
from .bus import Bus, BusEvent
from .config import Config
from .delivery.outcallservice import OutcallService
from .delivery.service import DeliveryService
from .errors import AppError, SourceError
from .flows.goals import GoalService
from .flows.service import FlowService
from .hooks import ContextProvider, IngestSink
from .http import Router
from .ingest.committer import GroupCommitter
from .ingest.service import IngestService
from .kernel import Kernel
from .metrics import Metrics
from .schema import messages
from .segments.engine import SegmentService
from .segments.transactions import TransactionService
from .simproviders import MemoryProvider, MemorySmsProvider, SentMessage
from .simrefresh import RefreshSchedule
from .simstore import run_inline
from .sources.datasources import DataSources, PreloadContext
from .sources.pools import SourceService
from .store import Store

__all__ = ["Answer", "MemoryProvider", "SentMessage", "SimEngine", "TimelineEntry",
           "VirtualClock", "moment"]

# rt.condition's answer: True/False, or a row (a mapping with a ``result`` column), or None
# for no row (False, as on a database).
Answer = Callable[[str, dict[str, object]], object]

_CAUSAL = {"event": 0, "segment": 1}  # the rank of a bus event's kind within one moment
API_KEY = "simulation"  # the bearer secret of the in-process API calls
SETTLE_ROUNDS = 10_000  # passes over the engines at one moment before it is a runaway
YIELDS = 10  # event-loop turns given to woken tasks before looking for their work
# Waits due within this are kept in the flow service's wheel: far more than the daemon's
# minutes, so its loader reads the store every few simulated days, not at every moment.
HORIZON = 7 * 86400.0  # seconds
NUDGE = dt.timedelta(microseconds=1)  # a step past a deadline that fell between wheel ticks
NUDGES = 1000  # nudges at one moment before the simulation is stuck


@dataclasses.dataclass(frozen=True)
class TimelineEntry:
    """Something that happened to a user: ``kind`` is the bus event's name
    (``segment.entered``, ``flow.started``, ``message.sent``, ...), ``detail`` its data."""

    at: dt.datetime  # naive UTC, the simulation's clock
    kind: str
    user_id: str
    detail: Mapping[str, object]


class VirtualClock:
    """A :class:`~segflowd.clock.Clock` that moves only when :meth:`jump` is called."""

    def __init__(self, start: dt.datetime) -> None:
        self._now = start
        self._mono = 0.0
        self._sleepers: list[tuple[float, int, anyio.Event]] = []  # a heap by deadline
        self._ids = itertools.count()

    def now(self) -> dt.datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        # A cancelled sleeper stays in the heap until its deadline: setting its event
        # then wakes nobody, and the ticker's sleeps are short (half the flow horizon).
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._ids), event))
        await event.wait()

    def jump(self, to: dt.datetime) -> int:
        """Set the time to ``to`` (never back) and wake every sleeper whose time passed;
        how many were woken."""
        seconds = (to - self._now).total_seconds()
        if seconds < 0:
            raise ValueError(f"the clock cannot go back from {self._now} to {to}")
        self._now = to
        self._mono += seconds
        woken = 0
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            heapq.heappop(self._sleepers)[2].set()
            woken += 1
        return woken


class _OutboxFlag:
    """The OutboxWaker of the simulation: notes that messages were queued."""

    def __init__(self) -> None:
        self.woken = True  # look once at start

    def wake(self) -> None:
        self.woken = True


class _Conditions:
    """ConditionRunner: the simulation's answers first, then the configured source."""

    def __init__(self, answers: Mapping[str, Answer], real: SourceService | None) -> None:
        self.answers = answers
        self.real = real

    async def condition(self, source: str, sql: str, params: Mapping[str, object]) -> bool:
        answer = self.answers.get(source)
        if answer is None:
            if self.real is not None and source in self.real.sources:
                return await self.real.condition(source, sql, params)
            raise KeyError(source)  # the flow fails: "condition on unknown source"
        result = answer(sql, dict(params))
        if isinstance(result, Mapping):
            if "result" not in result:
                cols = ", ".join(map(str, result)) or "none"
                raise SourceError(source, f"the answer for data source {source!r} has no "
                                          f"'result' column (columns: {cols})")
            return bool(result["result"])
        return bool(result)


class SimEngine:
    """The engines of one simulation; every method runs on the simulation's event loop."""

    def __init__(self, app: Segflow, config: Config, start: dt.datetime) -> None:
        self.app = app
        self.start = start
        self.clock = VirtualClock(start)
        self.store = Store.open(config.store.url)
        run_inline(self.store)
        self.bus = Bus()
        self.kernel = k = Kernel(config=config, app=app, store=self.store, clock=self.clock,
                                 bus=self.bus, metrics=Metrics())
        self.provider = MemoryProvider()
        self.sms = MemorySmsProvider()
        self.answers: dict[str, Answer] = {}
        self.outbox = _OutboxFlag()
        # As build_services wires them, less the control socket, audiences, broadcasts
        # and retention (nothing of a campaign's life depends on them).
        context: list[ContextProvider] = []
        self.sources = SourceService(k) if config.sources else None
        if self.sources is not None:
            context.append(PreloadContext(
                DataSources(self.sources, app.data_sources, app.audiences), self.store))
        self.delivery = DeliveryService(k, context_providers=context, providers={
            config.email.provider: self.provider, config.sms.provider: self.sms})
        self.flows = FlowService(k, wakers=[self.outbox], workers=2, horizon=HORIZON,
                                 conditions=_Conditions(self.answers, self.sources))
        self.outcalls = OutcallService(k, on_final=self.flows.schedule)  # rt.webhook's calls
        self.segments = SegmentService(k, membership_sinks=[self.flows])
        self.transactions = TransactionService(k, wakers=[self.outbox])
        self.goals = GoalService(k, flows=self.flows) if GoalService.wanted(k) else None
        sinks: list[IngestSink] = [self.flows, self.segments, self.transactions,
                                   *([self.goals] if self.goals is not None else [])]
        # No batching window: each call is committed at once (and alone).
        committer = GroupCommitter(self.store, self.clock, sinks, flush_delay=0.0,
                                   forget_window=None)
        self.ingest = IngestService(k, sinks=sinks, committer=committer)
        self.router = Router()
        self.ingest.register_routes(self.router)
        self.delivery.register_routes(self.router)
        self.timeline: list[TimelineEntry] = []
        self.sent: list[SentMessage] = []
        self._subscription = self.bus.subscribe(buffer=1 << 62)
        database = config.store.url.split(":///", 1)[1]
        self.schedule = RefreshSchedule(app, Path(database), start)
        self._stop = anyio.Event()

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Create the store, start the engines, settle the first moment; run until stop()."""
        try:
            await self.store.migrate()
            async with anyio.create_task_group() as tg:
                await tg.start(self.ingest.run)
                await tg.start(self.flows.run)
                await self.segments.start()
                await self.transactions.start()
                if self.goals is not None:
                    await self.goals.start()
                await self.delivery.recover()
                await self.settle()
                task_status.started()
                await self._stop.wait()
                await self.settle()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                self._subscription.close()
                self.schedule.close()
                if self.sources is not None:
                    await self.sources.aclose()
                await self.store.close()

    async def stop(self) -> None:
        self._stop.set()

    # -- time ------------------------------------------------------------------------

    def next_due(self) -> dt.datetime | None:
        """The next moment something is due: a flow's wait (or the loader) or a refresh."""
        cands = [t for t in (self.flows.next_due(), self.schedule.next_time()) if t is not None]
        return min(cands, default=None)

    async def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` on, stopping at each moment something is due."""
        end = self.clock.now() + dt.timedelta(seconds=seconds)
        nudges = 0
        await self.settle()
        while True:
            due = self.next_due()
            held = await self._next_held()
            if held is not None and (due is None or held < due):
                due = held
            if due is None or due > end:
                break
            now = self.clock.now()
            if due <= now:
                # Still due after settling: a wheel deadline rounds to a tick a hair later.
                nudges += 1
                if nudges > NUDGES:
                    raise RuntimeError(f"the simulation is stuck at {now}: something stays "
                                       "due and never runs")
                due = now + NUDGE
            else:
                nudges = 0
            woken = self.clock.jump(due)
            # A moment when only refreshes are due, and none would change anything (most
            # of them), needs nothing more.
            fire = self.flows.next_due()
            if due == held:
                self.outbox.woken = True  # delivery's poll would find it now
            if (await self._refresh() or woken or self.outbox.woken
                    or (fire is not None and fire <= due)):
                await self.settle()
        if end > self.clock.now():
            self.clock.jump(end)
        await self.settle()

    async def _next_held(self) -> dt.datetime | None:
        """When the next message queued for later is due (a retry's backoff, an SMS held
        for quiet hours): delivery sends it then, so time stops there too."""
        m = messages.c
        async with self.store.connect() as conn:
            when = (await conn.execute(sa.select(sa.func.min(m.next_attempt_at)).where(
                m.status == "queued", m.next_attempt_at > self.clock.now()))).scalar()
        return when if isinstance(when, dt.datetime) else None

    async def _refresh(self) -> bool:
        """Refresh the segments due now that would change; whether any was refreshed."""
        now = self.clock.now()
        busy = False
        for name in self.schedule.due(now):
            if not self.schedule.would_change(name, now):
                continue
            busy = True
            # One at a time (the daemon runs two side by side): on SQLite the second
            # would only wait for the first's write lock. A broken segment, or a refresh
            # that failed, is recorded and logged by the engine; it is tried again after
            # its interval, as the daemon's scheduler does.
            with contextlib.suppress(AppError):
                await self.segments.refresh(name)
        return busy

    async def settle(self) -> None:
        """Run every engine until nothing is left to do at this moment."""
        for _ in range(SETTLE_ROUNDS):
            if await self._round():
                continue
            # Quiet: let tasks that were just woken or just went idle (the flow ticker,
            # whose sleep starts in a task of its own) take their turns, and look again:
            # a wait fired meanwhile must be stepped before the clock moves on.
            steps = self.flows.statistics().steps
            await _turns(YIELDS)
            await self.flows.settle()
            if self.flows.statistics().steps == steps and not self.outbox.woken:
                break
        else:
            raise RuntimeError(f"the simulation kept finding work at {self.clock.now()}: "
                               "a flow that never waits?")
        await self._collect()

    async def _round(self) -> bool:
        """One pass over the engines; whether any had work."""
        await _turns(YIELDS)  # woken tasks (the flow ticker) take their work first
        await self.flows.settle()
        busy = False
        if self.segments.statistics().dirty:
            await self.segments.drain_once()
            busy = True
        if await self._refresh():
            busy = True
        if self.transactions.statistics().pending:
            await self.transactions.process_pending()
            busy = True
        if self.goals is not None and self.goals.statistics().pending:
            await self.goals.process_pending()  # conversions (exit_on_goal ends flows)
            busy = True
        await self.flows.settle()
        if self.outbox.woken:
            self.outbox.woken = False
            while await self.delivery.run_once() + await self.outcalls.run_once():
                busy = True
        # A wheel deadline still due here is advance()'s to handle: it may lie a hair
        # before the tick it fires on.
        return busy

    # -- what happened ---------------------------------------------------------------

    async def _collect(self) -> None:
        """Move this moment's bus events into the timeline and the sent list."""
        now = moment(self.clock.now())
        sent: list[tuple[int, Mapping[str, object]]] = []
        batch: list[BusEvent] = []
        while self._subscription.pending():
            batch += self._subscription.drain(limit=100_000)[0]
        # All at one moment: in the order things cause each other (events, then the
        # segment changes they made, then what flows and delivery did), rather than the
        # order of publishing (a flow hears of an exit before the bus does).
        batch.sort(key=lambda e: _CAUSAL.get(e.kind.split(".", 1)[0], 2))
        for e in batch:
            uid = e.data.get("user_id")
            if not isinstance(uid, str):
                continue
            detail = {k: v for k, v in e.data.items() if k != "user_id"}
            if e.kind == "message.sent" and isinstance(e.data.get("message"), int):
                mid = int(str(e.data["message"]))
                msg = self.provider.messages.get(mid)
                if msg is not None:
                    detail["subject"] = msg.subject
                if msg is not None or mid in self.sms.messages:
                    sent.append((mid, e.data))
            self.timeline.append(TimelineEntry(now, e.kind, uid, detail))
        if not sent:
            return
        ids = [mid for mid, _ in sent]
        async with self.store.connect() as conn:
            rows = {int(r.id): r for r in await conn.execute(
                sa.select(messages.c.id, messages.c.campaign, messages.c.kind)
                .where(messages.c.id.in_(ids)))}
        for mid, data in sent:
            row = rows.get(mid)
            uid = data.get("user_id")
            if mid in self.sms.messages:
                self.sent.append(self.sms.sent(
                    mid, user_id=uid if isinstance(uid, str) else None,
                    template=str(data.get("template")), at=now,
                    campaign=None if row is None else row.campaign,
                    kind="" if row is None else str(row.kind)))
                continue
            msg = self.provider.messages[mid]
            self.sent.append(SentMessage(
                id=mid, user_id=uid if isinstance(uid, str) else None,
                template=str(data.get("template")), subject=msg.subject, to=msg.to,
                html=msg.html, text=msg.text, at=now,
                campaign=None if row is None else row.campaign,
                kind="" if row is None else str(row.kind), mime=msg.mime))

    # -- the HTTP routes, in-process -------------------------------------------------

    async def call(self, method: str, path: str, body: object = None
                   ) -> tuple[int, dict[str, Any]]:
        """One request to the daemon's router; (status, JSON body or {})."""
        raw = b"" if body is None else json.dumps(body).encode()
        headers = [(b"authorization", f"Bearer {API_KEY}".encode()),
                   (b"content-type", b"application/json"),
                   (b"content-length", str(len(raw)).encode())]
        scope = {"type": "http", "method": method, "path": path,
                 "raw_path": path.encode(), "query_string": b"", "headers": headers,
                 "client": ("127.0.0.1", 0)}
        sent = False
        reply: dict[str, Any] = {}

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                reply["status"] = message["status"]
            else:
                reply["body"] = reply.get("body", b"") + message.get("body", b"")

        await self.router(scope, receive, send)
        data = reply.get("body", b"")
        try:
            parsed = json.loads(data) if data.startswith(b"{") else {}
        except ValueError:
            parsed = {}
        return int(reply["status"]), parsed

    async def put_user(self, user_id: str, attributes: Mapping[str, object]) -> None:
        status, body = await self.call("PUT", f"/v1/users/{_seg(user_id)}",
                                       {"attributes": dict(attributes)})
        _check(status, body, f"user {user_id!r}")
        await self.settle()

    async def post_event(self, user_id: str, name: str, at: dt.datetime | None,
                         attributes: Mapping[str, object]) -> None:
        body: dict[str, object] = {"name": name, "attributes": dict(attributes)}
        if at is not None:
            body["timestamp"] = at.isoformat() + "Z"
        status, reply = await self.call("POST", f"/v1/users/{_seg(user_id)}/events", body)
        _check(status, reply, f"event {name!r} of user {user_id!r}")
        await self.settle()

    async def engage(self, kind: str, message_id: int, url: str | None) -> None:
        """An open (``kind`` "o") or a click ("c") through the tracking routes."""
        signer = self.delivery.signer
        token = (signer.sign("o", {"m": message_id}) if url is None
                 else signer.sign("c", {"m": message_id, "l": url}))
        status, reply = await self.call("GET", f"/t/{kind}/{token}")
        _check(status, reply, "the tracking link" if url is None else f"link {url!r}")
        await self.settle()


def moment(t: dt.datetime) -> dt.datetime:
    """``t`` to the millisecond: what the timeline shows (the wheel ticks every 0.1 s,
    and a wait's step may run a microsecond past its deadline, see ``NUDGE``)."""
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


async def _turns(n: int) -> None:
    """Let every ready task run ``n`` times."""
    for _ in range(n):
        await anyio.lowlevel.checkpoint()


def _seg(text: str) -> str:
    """``text`` as one URL path segment."""
    return quote(text, safe="")


def _check(status: int, body: Mapping[str, Any], what: str) -> None:
    if status < 400:
        return
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    raise ValueError(f"{what}: {message or f'HTTP {status}'}")
