"""Delivery: outbox workers that render, check, send and record each queued message.

A message row goes ``queued → claimed → sending → sent | failed | suppressed | unknown``. A
worker claims due rows (``next_attempt_at <= now``) in one short transaction, renders with
no transaction open, marks each message ``sending`` in a commit right before the call that
hands it to the provider (:func:`~segflowd.delivery.sending.hand_over`), and records each
call's outcomes as soon as it returns (an outage's with the batch, once the provider's
circuit has judged it); a row whose mark failed is queued again, its attempt given back.
Delivery is at-most-once: a message that may have reached the provider is never re-sent by
itself (``message.retry`` re-queues it on purpose). So a provider's answer that leaves the
outcome open (see :mod:`segflowd.providers`) makes the message ``unknown`` at once, and so
does a cancelled worker for the batch its provider had; a row found ``sending`` when the
service starts was being sent when the process died, and becomes ``unknown`` then, while
one found ``claimed`` never reached the provider and is ``queued`` again. A row is never
left ``sending`` by an error in the process: one that certainly did not go out fails (an
error preparing it) or is queued again (a cancelled worker). Transient errors retry with
exponential backoff and jitter up to ``[email] max_attempts``; permanent ones fail the
message and, where the provider says so, suppress the address.

Marketing mail may go through a provider of its own (``[email] provider_marketing``):
each provider is a lane (:mod:`segflowd.delivery.lanes`) that claims only its kinds of
message. Per provider (``[providers.NAME]``): ``rate`` (messages per second, token
bucket; 0 is unlimited), ``burst``, ``concurrency`` (parallel send calls) and ``render_processes``
(worker processes that render, see :mod:`segflowd.delivery.renderpool`; 0, the default, renders
in the daemon's process).

Preparing a claimed batch (users, suppressions, rendering) is :mod:`segflowd.delivery.prepare`;
handing it to the provider and reading the answer, :mod:`segflowd.delivery.sending`;
recording its outcomes, and the counts behind :meth:`DeliveryService.statistics`, is
:mod:`segflowd.delivery.outcomes`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import sqlalchemy as sa
import structlog
from anyio.abc import TaskStatus

from ..errors import StoreUnavailable
from ..hooks import ContextProvider, IngestBatch
from ..http import Router
from ..kernel import Kernel
from ..providers import Provider, SendResult, SmsProvider
from ..schema import messages
from .forgetting import ProviderCopies
from .lanes import Lane, TokenBucket, build_lanes
from .mime import domain_of, make_message_id
from .outbox import MessageKind, enqueue
from .outcomes import DeliveryStatistics
from .prepare import BatchPreparer, Prepared
from .renderpool import RenderPool
from .sending import hand_over
from .sms import SmsPreparer
from .smshooks import settle_reports
from .templates import Renderer
from .tokens import Signer, ephemeral_key
from .tracking import EngagementRecorder

__all__ = ["DeliveryService", "TokenBucket"]

log = structlog.get_logger("segflowd.delivery")

DEFAULT_RENDER_PROCESSES = 0  # render worker processes; 0 renders in the daemon's process
TEST_WAIT = 30.0  # seconds "email.test" waits for its message to be sent
RECORD_RETRY = 1.0  # seconds between attempts to record sent messages while the store is down
RELEASE_TIMEOUT = 5.0  # seconds a cancelled worker spends settling its batch in the store
FINAL = frozenset({"sent", "failed", "suppressed", "unknown"})
LANE_CHANNELS = ("email", "sms")  # the channels the lanes send (webhooks: outcallservice)


class DeliveryService:
    """The outbox workers (a :class:`~segflowd.daemon.Service` and an ``OutboxWaker``)."""

    name = "delivery"

    def __init__(self, k: Kernel, *, context_providers: Sequence[ContextProvider] = (),
                 providers: Mapping[str, Provider | SmsProvider] | None = None,
                 rng: random.Random | None = None) -> None:
        self.k = k
        # A list given is kept by reference: services built later may still append.
        self.context_providers: list[ContextProvider] = (
            context_providers if isinstance(context_providers, list) else list(context_providers))
        self.renderer = Renderer(k.app)
        self.rng = rng or random.Random()
        ecfg = k.config.email
        if ecfg.secret:
            self.signer = Signer(ecfg.secret, previous=ecfg.secret_previous)
        else:
            log.warning("delivery.no_secret",
                        hint="set [email] secret, secret_env or secret_file: links die on restart")
            self.signer = Signer(ephemeral_key())
        self.public_url = (k.config.http.public_url or f"http://{k.config.http.listen}").rstrip("/")
        # Transactional mail's provider first, then marketing mail's when it has its own.
        self.lanes: list[Lane] = build_lanes(k, self.rng, providers)
        primary = self.lanes[0]
        self.options = primary.options
        # One pool for every lane, sized by the transactional provider's option.
        processes = int(str(self.options.get("render_processes", DEFAULT_RENDER_PROCESSES)))
        self.render_pool = RenderPool(k.app, processes) if processes > 0 else None
        self._outcomes = primary.outcomes  # the outbox totals, shared by every lane
        self._wake = anyio.Event()
        self._claim_lock = anyio.Lock()
        # (ids, claim token, provider): see _release_unclaimed
        self._unclaimed: list[tuple[list[int], str, str]] = []
        self._stopping = False
        self._done = anyio.Event()
        self._sender_domain = domain_of(ecfg.from_)
        self._preparer = BatchPreparer(
            k, context_providers=self.context_providers, renderer=self.renderer,
            render_pool=self.render_pool, signer=self.signer, public_url=self.public_url,
            sender_domain=self._sender_domain)
        self._sms = SmsPreparer(k, public_url=self.public_url, lane=k.config.sms.provider)
        self.copies = ProviderCopies(k, lambda: [lane.provider(k) for lane in self.lanes],
                                     lambda: {lane.name: lane.provider(k) for lane in self.lanes})
        self.engagement = EngagementRecorder(k)  # opens and clicks, written in the background
        self._copies_scope: anyio.CancelScope | None = None
        k.stats["delivery"] = self.statistics
        k.actions["email.test"] = self._action_test
        k.actions["message.retry"] = self._action_retry

    # -- the service -----------------------------------------------------------------

    @property
    def provider(self) -> Provider:
        """The provider of transactional mail (of all mail, without provider_marketing)."""
        provider = self.lanes[0].provider(self.k)
        assert isinstance(provider, Provider)  # the first lane is always mail's
        return provider

    def register_routes(self, router: Router) -> None:
        from .smshooks import SmsHooks
        from .tracking import Tracking
        from .webhooks import Webhooks

        Tracking(self.k, self.signer, self.engagement).register_routes(router)
        Webhooks(self.k).register_routes(router)
        SmsHooks(self.k).register_routes(router)

    def wake(self) -> None:
        self._wake.set()

    def ingested(self, batch: IngestBatch) -> None:
        """An ingest sink: a forget's messages lose what the provider kept of them."""
        self.copies.ingested(batch)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        for lane in self.lanes:
            lane.provider(self.k)  # a plugin that cannot load stops the start, clearly
        await self.recover()
        if self.render_pool is not None:
            self.render_pool.start()
        try:
            async with anyio.create_task_group() as tg:
                for lane in self.lanes:
                    for i in range(lane.concurrency):
                        tg.start_soon(self._worker, lane, i)
                tg.start_soon(self._copies)
                await tg.start(self.engagement.run)
                task_status.started()
        finally:
            self._done.set()
            with anyio.CancelScope(shield=True):
                for lane in self.lanes:
                    if lane.loaded is not None:
                        await lane.loaded.aclose()
                if self.render_pool is not None:
                    await anyio.to_thread.run_sync(self.render_pool.close)

    async def drain(self) -> None:
        self._stopping = True
        self.engagement.stop()  # HTTP has stopped: write the last hits, then end
        if self._copies_scope is not None:
            self._copies_scope.cancel()
        self._wake.set()
        await self._done.wait()

    async def _copies(self) -> None:
        """Until the drain: a forget's copies are deleted as it commits."""
        with anyio.CancelScope() as scope:
            self._copies_scope = scope
            if self._stopping:
                scope.cancel()
            await self.copies.run()

    async def _worker(self, lane: Lane, index: int) -> None:
        while not self._stopping:
            try:
                n = await self.run_once(lane)
                if n == 0 and not self._stopping:
                    await self._outcomes.refresh_depth()
                    if index == 0 and lane is self.lanes[0] and not self.k.config.sms.provider:
                        await self._fail_unsendable()
            except Exception as exc:  # the store went away: keep the worker, try later
                log.warning("delivery.error", provider=lane.name, worker=index,
                            error=f"{type(exc).__name__}: {exc}")
                n = 0
            if n == 0 and not self._stopping:
                await self._idle(self.k.config.email.poll_interval)

    async def _idle(self, seconds: float) -> None:
        async with anyio.create_task_group() as tg:
            async def sleeper() -> None:
                await self.k.clock.sleep(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(sleeper)
            await self._wake.wait()
            tg.cancel_scope.cancel()
        self._wake = anyio.Event()

    # -- recovery --------------------------------------------------------------------

    async def recover(self) -> list[int]:
        """Mark rows left ``sending`` by a crash ``unknown`` (not re-sent) and queue those
        left ``claimed`` again (the provider never had them); return the unknown ids."""
        now = self.k.clock.now()
        mine = messages.c.channel.in_(LANE_CHANNELS)  # webhooks recover on their own
        async with self.k.store.begin() as conn:
            await conn.execute(sa.update(messages).where(messages.c.status == "claimed", mine)
                               .values(status="queued", attempts=messages.c.attempts - 1,
                                       updated_at=now))
            rows = (await conn.execute(
                sa.select(messages.c.id, messages.c.user_id, messages.c.template,
                          messages.c.message_id)
                .where(messages.c.status == "sending", mine))).all()
            if rows:
                await conn.execute(
                    sa.update(messages).where(messages.c.id.in_([r.id for r in rows]),
                                              messages.c.status == "sending")
                    .values(status="unknown", updated_at=now,
                            last_error="the process stopped while sending: may or may not "
                                       "have been delivered (not re-sent)"))
        for r in rows:
            log.warning("message.unknown", message=r.id, user_id=r.user_id, template=r.template,
                        message_id=r.message_id)
            self.k.bus.publish("message.unknown", message=r.id, user_id=r.user_id,
                               template=r.template, message_id=r.message_id)
            self.k.metrics.inc("segflow_messages_total", status="unknown")
        self._outcomes.totals["unknown"] += len(rows)
        return [r.id for r in rows]

    async def _fail_unsendable(self) -> None:
        """Fail due SMS when no ``[sms] provider`` is configured (no lane would ever take
        them), rather than leave them queued for good."""
        m, now = messages.c, self.k.clock.now()
        error = "no [sms] provider is configured: the SMS cannot be sent"
        async with self.k.store.begin() as conn:
            rows = (await conn.execute(sa.select(m.id, m.user_id, m.template).where(
                m.status == "queued", m.next_attempt_at <= now, m.channel == "sms")
                .limit(1000))).all()
            if rows:
                await conn.execute(sa.update(messages).where(
                    m.id.in_([r.id for r in rows]), m.status == "queued").values(
                    status="failed", last_error=error, updated_at=now))
        for r in rows:
            data = {"message": r.id, "user_id": r.user_id, "template": r.template,
                    "channel": "sms", "error": error}
            self.k.bus.publish("message.failed", **data)
        if rows:
            log.warning("message.failed", messages=len(rows), channel="sms", error=error)
            self.k.metrics.inc("segflow_messages_total", len(rows), status="failed")
            self.k.metrics.inc("segflow_channel_messages_total", len(rows), channel="sms",
                               status="failed")
            self._outcomes.totals["failed"] += len(rows)

    # -- one batch -------------------------------------------------------------------

    async def run_once(self, lane: Lane | None = None) -> int:
        """Claim, send and record one batch of due messages of ``lane`` (of each lane, in
        turn, without one); return how many were claimed."""
        if lane is None:
            return sum([await self.run_once(each) for each in self.lanes])
        admitted = lane.circuit.admit(self.k.clock.monotonic())
        if admitted is None:  # the provider is down: nothing is claimed but its probe
            if self._unclaimed:
                async with self._claim_lock:
                    await self._release_unclaimed()
            return 0
        try:
            return await self._run_batch(lane, admitted)
        finally:
            lane.circuit.unanswered(self.k.clock.monotonic())  # a probe that sent nothing

    async def _run_batch(self, lane: Lane, admitted: int) -> int:
        provider = lane.provider(self.k)
        size = min(admitted, max(1, int(provider.max_batch)))
        if lane.rate > 0:
            size = min(size, int(lane.bucket.burst))
        await lane.bucket.acquire(size)
        async with self._claim_lock:
            await self._release_unclaimed()
            rows = await self._claim(size, lane)
        lane.bucket.refund(size - len(rows))
        if not rows:
            return 0
        outcomes = lane.outcomes
        handed: set[int] = set()  # rows whose message the provider has been given
        claim = str(rows[0]["claim"])
        answers: dict[int, SendResult] = {}
        try:
            prepared = await self._prepare(rows, lane)
            to_send = [p for p in prepared if p.message is not None]
            # Held, failed or suppressed here: the provider's pace was not spent on them.
            lane.bucket.refund(len(rows) - len(to_send))
            if to_send:
                out = await hand_over(
                    provider, lane.name, to_send,
                    mark=lambda ids: outcomes.mark_sending(ids, claim), handed=handed,
                    record=outcomes.record, counters=outcomes.counters,
                    metrics=self.k.metrics)
                answers = out.results
                if out.answered and not lane.circuit.answered(
                        out.answered, self.k.clock.now(), self.k.clock.monotonic()):
                    # Not the provider's outage as a whole: an outage answer among
                    # others is a transient failure of that message, with its backoff.
                    answers = {k: dataclasses.replace(r, outage=False, transient=True)
                               if r.outage else r for k, r in answers.items()}
                # Not handed over after all: queued again, the attempt given back.
                back = {id(p): dataclasses.replace(p, status="unsent", error=error)
                        for p, error in out.unsent}
                prepared = [back.get(id(p), p) for p in prepared if id(p) not in out.recorded]
        except BaseException:
            # Cancelled (a drain cut short): what the provider had is `unknown` now, the
            # rest goes back to the queue, rather than all of it `unknown` at the next start.
            with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT):
                try:
                    await outcomes.release(rows, handed)
                except Exception as exc:  # left claimed: the next start settles them
                    log.warning("delivery.release_failed", messages=len(rows),
                                error=f"{type(exc).__name__}: {exc}")
            raise
        while True:
            try:
                await outcomes.record(prepared, answers)
                if lane.channel == "sms" and answers:
                    await settle_reports(self.k, [int(r["id"]) for r in rows])
                break
            except StoreUnavailable as exc:
                # The outcomes are known; left `sending` they would turn `unknown` at the
                # next start. Keep them until the store answers again.
                log.warning("delivery.record_retry", messages=len(prepared),
                            error=str(exc)[:300], retry_in_s=RECORD_RETRY)
                await self.k.clock.sleep(RECORD_RETRY)
        return len(rows)

    async def _prepare(self, rows: Sequence[Mapping[str, Any]], lane: Lane) -> list[Prepared]:
        """The batch prepared; a fault of ours while preparing fails every message whose
        fate was not yet decided (nothing of it went out) instead of leaving it claimed."""
        try:
            if lane.channel == "sms":
                return await self._sms.prepare(rows)
            return await self._preparer.prepare(rows)
        except Exception as exc:
            error = f"preparing the message failed: {type(exc).__name__}: {exc}"
            log.error("delivery.prepare_failed", messages=len(rows), error=error)
            return [Prepared(r, status="failed", error=error) for r in rows]

    async def _release_unclaimed(self) -> None:
        """Claims whose COMMIT was reported failed may have applied: their rows, if they
        are ``claimed`` under that claim, go back to ``queued`` (nothing was handed to the
        provider), rather than wait for the next start."""
        while self._unclaimed:
            ids, claim, provider = self._unclaimed[0]
            m = messages.c
            async with self.k.store.begin() as conn:
                await conn.execute(sa.update(messages).where(
                    m.id.in_(ids), m.status == "claimed", m.claim == claim,
                    m.provider == provider).values(
                    status="queued", attempts=m.attempts - 1))
            self._unclaimed.pop(0)

    async def _claim(self, size: int, lane: Lane) -> list[Mapping[str, Any]]:
        now = self.k.clock.now()
        picked: list[int] = []
        claim = secrets.token_hex(16)  # this claim's rows, and only they, are ours
        try:
            return await self._claim_at(size, now, picked, lane, claim)
        except BaseException:
            if picked:  # the claim's UPDATE was sent: it may have committed
                self._unclaimed.append((picked, claim, lane.name))
            raise

    async def _claim_at(self, size: int, now: dt.datetime, picked: list[int], lane: Lane,
                        claim: str) -> list[Mapping[str, Any]]:
        due = sa.select(messages).where(messages.c.status == "queued",
                                        messages.c.next_attempt_at <= now,
                                        messages.c.channel == lane.channel)
        if lane.kinds is not None:  # the lane's own kinds of message only
            due = due.where(messages.c.kind.in_(sorted(lane.kinds)))
        async with self.k.store.begin() as conn:
            rows = (await conn.execute(
                due.order_by(messages.c.next_attempt_at, messages.c.id).limit(size)
                .with_for_update(skip_locked=True))).mappings().all()
            if not rows:
                return []
            picked.extend(int(r["id"]) for r in rows)
            await conn.execute(
                sa.update(messages).where(messages.c.id.in_([r["id"] for r in rows]),
                                          messages.c.status == "queued")
                .values(status="claimed", attempts=messages.c.attempts + 1,
                        provider=lane.name, claim=claim, updated_at=now))
            # The Message-ID is stored before any byte leaves: a send cut by a crash is
            # `unknown` and still names what the provider may have delivered.
            fresh = {int(r["id"]): make_message_id(int(r["id"]), self._sender_domain)
                     for r in rows if not r["message_id"] and lane.channel == "email"}
            if fresh:
                await conn.execute(
                    sa.update(messages).where(messages.c.id == sa.bindparam("b_id"))
                    .values(message_id=sa.bindparam("b_mid")),
                    [{"b_id": i, "b_mid": mid} for i, mid in fresh.items()])
        return [dict(r, attempts=r["attempts"] + 1, claim=claim,
                     message_id=r["message_id"] or fresh.get(int(r["id"]))) for r in rows]

    # -- statistics and actions ------------------------------------------------------

    def statistics(self) -> DeliveryStatistics:
        return self._outcomes.statistics([lane.statistics() for lane in self.lanes])

    async def _action_test(self, args: Mapping[str, object]) -> object:
        template, to = args.get("template"), args.get("to")
        if not isinstance(template, str) or template not in self.k.app.templates:
            raise ValueError(f"email.test: unknown template {template!r}")
        if not isinstance(to, str) or not to:
            raise ValueError("email.test: 'to' must be an email address")
        user = args.get("user")
        if user is not None and not isinstance(user, str):
            raise ValueError("email.test: 'user' must be a user id")
        data = args.get("data", {})
        if not isinstance(data, dict):
            raise ValueError("email.test: 'data' must be an object (the template's context)")
        msg_id = await self.queue(kind="test", template=template, to_address=to, user_id=user,
                                  data=data)
        self.wake()
        status, error = "queued", None
        with anyio.move_on_after(TEST_WAIT):
            while status not in FINAL:
                await anyio.sleep(0.05)
                status, error = await self._status_of(msg_id)
        return {"message": msg_id, "status": status, "error": error}

    async def _action_retry(self, args: Mapping[str, object]) -> object:
        mid = args.get("message")
        if not isinstance(mid, int) or isinstance(mid, bool):
            raise ValueError("message.retry: 'message' must be a message id (integer)")
        now = self.k.clock.now()
        async with self.k.store.begin() as conn:
            done = await conn.execute(sa.update(messages).where(
                messages.c.id == mid, messages.c.status.in_(["failed", "unknown"]))
                .values(status="queued", attempts=0, next_attempt_at=now, updated_at=now,
                        last_error=None))
        if done.rowcount != 1:
            raise KeyError(f"message {mid} does not exist or is not failed/unknown")
        self.k.bus.publish("message.requeued", message=mid)
        self.wake()
        return {"message": mid, "status": "queued"}

    async def queue(self, *, kind: MessageKind, template: str, to_address: str | None = None,
                    user_id: str | None = None,
                    data: Mapping[str, object] | None = None) -> int:
        """Queue one message now (tests, ``email.test``); flows use :func:`outbox.enqueue`."""
        async with self.k.store.begin() as conn:
            mid = await enqueue(conn, kind=kind, template=template, now=self.k.clock.now(),
                                user_id=user_id, dedupe_key=None, to_address=to_address,
                                data=data)
        assert mid is not None  # no dedupe key: always inserted
        return mid

    async def _status_of(self, mid: int) -> tuple[str, str | None]:
        """The message's status and its last error (None: none)."""
        async with self.k.store.connect() as conn:
            status, error = (await conn.execute(
                sa.select(messages.c.status, messages.c.last_error)
                .where(messages.c.id == mid))).one()
        return str(status), None if error is None else str(error)
