"""Delivery: outbox workers that render, check, send and record each queued message.

A message row goes ``queued → sending → sent | failed | suppressed``. A worker claims
due rows (``next_attempt_at <= now``) in one short transaction, renders and sends with
no transaction open, then records every outcome in a second one. A row found
``sending`` when the service starts was being sent when the process died: it becomes
``unknown`` and is reported, never re-sent (at-most-once; ``message.retry`` re-queues
it on purpose). Transient errors retry with exponential backoff and jitter up to
``[email] max_attempts``; permanent ones fail the message and, where the provider says
so, suppress the address.

Per provider (``[providers.NAME]``): ``rate`` (messages per second, token bucket; 0 is
unlimited), ``burst``, ``concurrency`` (parallel send calls) and ``render_processes``
(worker processes that render, see :mod:`segflowd.delivery.renderpool`; 0, the default, renders
in the daemon's process).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import random
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import sqlalchemy as sa
import structlog
from anyio.abc import TaskStatus

from ..clock import Clock
from ..errors import StoreUnavailable, TemplateError
from ..hooks import ContextProvider
from ..http import Router
from ..kernel import Kernel
from ..providers import OutgoingMessage, Provider, ProviderContext, SendResult, load_provider
from ..schema import messages, subscriptions, suppressions, users
from .mime import (
    InvalidAddress,
    MessageParts,
    build_message,
    domain_of,
    make_message_id,
    parse_address,
)
from .outbox import MessageKind, enqueue
from .renderpool import RenderJob, RenderPool, RenderPoolError, RenderResult, render_jobs
from .templates import Rendered, Renderer, add_tracking, sample_user
from .tokens import Signer, ephemeral_key

__all__ = ["DeliveryService", "DeliveryStatistics", "ProviderStatistics",
           "TokenBucket", "backoff"]

log = structlog.get_logger("segflowd.delivery")

DEFAULT_CONCURRENCY = 1  # parallel send calls per provider
DEFAULT_RATE = 0.0  # messages per second per provider; 0 means unlimited
DEFAULT_RENDER_PROCESSES = 0  # render worker processes; 0 renders in the daemon's process
TEST_WAIT = 30.0  # seconds "email.test" waits for its message to be sent
RECORD_RETRY = 1.0  # seconds between attempts to record sent messages while the store is down
MARKETING_TOPIC = "marketing"
MARKETING_KINDS = frozenset({"campaign", "broadcast"})
FINAL = frozenset({"sent", "failed", "suppressed", "unknown"})


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before retry number ``attempt`` (1-based): capped doubling, half jittered."""
    delay = min(cap, base * (2.0 ** max(0, attempt - 1)))
    return delay / 2 + rng.random() * delay / 2


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; time from the injected clock."""

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock.monotonic()

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    async def acquire(self, n: int) -> None:
        if self.rate <= 0:
            return
        need = min(float(n), self.burst)
        while True:
            self._refill()
            if self._tokens >= need:
                self._tokens -= need
                return
            await self._clock.sleep((need - self._tokens) / self.rate)

    def refund(self, n: int) -> None:
        if self.rate > 0 and n > 0:
            self._tokens = min(self.burst, self._tokens + n)


@dataclasses.dataclass(frozen=True)
class ProviderStatistics:
    name: str
    plugin: str
    sent: int
    failed: int
    transient_errors: int
    batches: int
    in_flight: int
    rate: float
    concurrency: int


@dataclasses.dataclass(frozen=True)
class DeliveryStatistics:
    """Outbox depth per status (as of the last poll), throughput and failures."""

    outbox: Mapping[str, int]
    sent: int
    failed: int
    suppressed: int
    retried: int
    unknown: int
    sent_per_second: float
    providers: tuple[ProviderStatistics, ...]


@dataclasses.dataclass
class _Counters:
    sent: int = 0
    failed: int = 0
    transient: int = 0
    batches: int = 0
    in_flight: int = 0


@dataclasses.dataclass
class _Prepared:
    row: Mapping[str, Any]
    user: dict[str, Any] = dataclasses.field(default_factory=dict)
    address: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: OutgoingMessage | None = None
    status: str | None = None  # decided without sending: failed | suppressed | retry
    error: str | None = None


class DeliveryService:
    """The outbox workers (a :class:`~segflowd.daemon.Service` and an ``OutboxWaker``)."""

    name = "delivery"

    def __init__(self, k: Kernel, *, context_providers: Sequence[ContextProvider] = (),
                 providers: Mapping[str, Provider] | None = None,
                 rng: random.Random | None = None) -> None:
        self.k = k
        # A list given is kept by reference: services built later may still append.
        self.context_providers: list[ContextProvider] = (
            context_providers if isinstance(context_providers, list) else list(context_providers))
        self.renderer = Renderer(k.app)
        self.rng = rng or random.Random()
        ecfg = k.config.email
        if ecfg.secret:
            self.signer = Signer(ecfg.secret)
        else:
            log.warning("delivery.no_secret",
                        hint="set [email] secret or secret_env: links die on restart")
            self.signer = Signer(ephemeral_key())
        self.public_url = (k.config.http.public_url or f"http://{k.config.http.listen}").rstrip("/")
        self.provider_name = ecfg.provider
        table = k.config.providers.get(self.provider_name)
        self.options: dict[str, object] = dict(table.options) if table else {}
        self.rate = float(str(self.options.get("rate", DEFAULT_RATE)))
        self.concurrency = max(1, int(str(self.options.get("concurrency", DEFAULT_CONCURRENCY))))
        self.burst = float(str(self.options.get("burst", max(1.0, self.rate))))
        processes = int(str(self.options.get("render_processes", DEFAULT_RENDER_PROCESSES)))
        self.render_pool = RenderPool(k.app, processes) if processes > 0 else None
        self._provider: Provider | None = (providers or {}).get(self.provider_name)
        self._bucket = TokenBucket(self.rate, self.burst, k.clock)
        self._counters = _Counters()
        self._totals = {"sent": 0, "failed": 0, "suppressed": 0, "retried": 0, "unknown": 0}
        self._depth: dict[str, int] = {}
        self._recent: list[tuple[float, int]] = []  # (monotonic, sent) per batch
        self._wake = anyio.Event()
        self._claim_lock = anyio.Lock()
        self._stopping = False
        self._done = anyio.Event()
        self._sender_domain = domain_of(ecfg.from_)
        m = k.metrics
        m.describe("segflow_messages_total", "counter", "messages by outcome")
        m.describe("segflow_outbox_messages", "gauge", "outbox rows by status")
        m.collect(lambda: [("segflow_outbox_messages", {"status": s}, float(n))
                           for s, n in self._depth.items()])
        k.stats["delivery"] = self.statistics
        k.actions["email.test"] = self._action_test
        k.actions["message.retry"] = self._action_retry

    # -- the service -----------------------------------------------------------------

    @property
    def provider(self) -> Provider:
        if self._provider is None:
            self._provider = load_provider(ProviderContext(
                self.provider_name, self.options, self.k.config.base_dir))
        return self._provider

    def register_routes(self, router: Router) -> None:
        from .tracking import Tracking
        from .webhooks import Webhooks

        Tracking(self.k, self.signer).register_routes(router)
        Webhooks(self.k).register_routes(router)

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        _ = self.provider  # a plugin that cannot load stops the start, clearly
        await self.recover()
        if self.render_pool is not None:
            self.render_pool.start()
        try:
            async with anyio.create_task_group() as tg:
                for i in range(self.concurrency):
                    tg.start_soon(self._worker, i)
                task_status.started()
        finally:
            self._done.set()
            with anyio.CancelScope(shield=True):
                await self.provider.aclose()
                if self.render_pool is not None:
                    await anyio.to_thread.run_sync(self.render_pool.close)

    async def drain(self) -> None:
        self._stopping = True
        self._wake.set()
        await self._done.wait()

    async def _worker(self, index: int) -> None:
        while not self._stopping:
            try:
                n = await self.run_once()
                if n == 0 and not self._stopping:
                    await self._refresh_depth()
            except Exception as exc:  # the store went away: keep the worker, try later
                log.warning("delivery.error", worker=index, error=f"{type(exc).__name__}: {exc}")
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
        """Mark rows left ``sending`` by a crash ``unknown`` (not re-sent); return their ids."""
        now = self.k.clock.now()
        async with self.k.store.begin() as conn:
            rows = (await conn.execute(
                sa.select(messages.c.id, messages.c.user_id, messages.c.template,
                          messages.c.message_id)
                .where(messages.c.status == "sending"))).all()
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
        self._totals["unknown"] += len(rows)
        return [r.id for r in rows]

    # -- one batch -------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim, send and record one batch of due messages; return how many were claimed."""
        provider = self.provider
        size = max(1, int(provider.max_batch))
        if self.rate > 0:
            size = min(size, int(self.burst))
        await self._bucket.acquire(size)
        async with self._claim_lock:
            rows = await self._claim(size)
        self._bucket.refund(size - len(rows))
        if not rows:
            return 0
        prepared = await self._prepare_batch(rows)
        to_send = [p for p in prepared if p.message is not None]
        results: list[SendResult] = []
        if to_send:
            c = self._counters
            c.in_flight += len(to_send)
            try:
                results = await provider.send([p.message for p in to_send if p.message])
                if len(results) != len(to_send):
                    raise RuntimeError(f"provider returned {len(results)} results for "
                                       f"{len(to_send)} messages")
            except Exception as exc:
                err = f"{type(exc).__name__}: {exc}"
                log.warning("provider.error", provider=self.provider_name, error=err)
                results = [SendResult(ok=False, error=err, transient=True)] * len(to_send)
            finally:
                c.in_flight -= len(to_send)
                c.batches += 1
        outcomes = dict(zip([id(p) for p in to_send], results, strict=True))
        while True:
            try:
                await self._record(prepared, outcomes)
                break
            except StoreUnavailable as exc:
                # The outcomes are known; left `sending` they would turn `unknown` at the
                # next start. Keep them until the store answers again.
                log.warning("delivery.record_retry", messages=len(prepared),
                            error=str(exc)[:300], retry_in_s=RECORD_RETRY)
                await self.k.clock.sleep(RECORD_RETRY)
        return len(rows)

    async def _claim(self, size: int) -> list[Mapping[str, Any]]:
        now = self.k.clock.now()
        async with self.k.store.begin() as conn:
            rows = (await conn.execute(
                sa.select(messages).where(messages.c.status == "queued",
                                          messages.c.next_attempt_at <= now)
                .order_by(messages.c.next_attempt_at, messages.c.id).limit(size)
                .with_for_update(skip_locked=True))).mappings().all()
            if not rows:
                return []
            await conn.execute(
                sa.update(messages).where(messages.c.id.in_([r["id"] for r in rows]),
                                          messages.c.status == "queued")
                .values(status="sending", attempts=messages.c.attempts + 1,
                        provider=self.provider_name, updated_at=now))
            # The Message-ID is stored before any byte leaves: a send cut by a crash is
            # `unknown` and still names what the provider may have delivered.
            fresh = {int(r["id"]): make_message_id(int(r["id"]), self._sender_domain)
                     for r in rows if not r["message_id"]}
            if fresh:
                await conn.execute(
                    sa.update(messages).where(messages.c.id == sa.bindparam("b_id"))
                    .values(message_id=sa.bindparam("b_mid")),
                    [{"b_id": i, "b_mid": mid} for i, mid in fresh.items()])
        return [dict(r, attempts=r["attempts"] + 1,
                     message_id=r["message_id"] or fresh[int(r["id"])]) for r in rows]

    async def _prepare_batch(self, rows: Sequence[Mapping[str, Any]]) -> list[_Prepared]:
        """Read what the batch needs in three queries, then render it off the event loop."""
        prepared = [_Prepared(r) for r in rows]
        try:
            await self._gather(prepared)
        except Exception as exc:  # the store or a context provider failed: try again later
            for p in prepared:
                if p.status is None:
                    p.status = "retry"
                    p.error = f"preparing the message: {type(exc).__name__}: {exc}"
            return prepared
        # Rendering is CPU work (Jinja2, css-inline, the text part): a worker thread keeps
        # the event loop (ingest, the control socket) responsive meanwhile, and hands the
        # batch to the render processes where there are some.
        await anyio.to_thread.run_sync(self._render_all, prepared)
        return prepared

    async def _gather(self, prepared: list[_Prepared]) -> None:
        user_ids = sorted({str(p.row["user_id"]) for p in prepared
                           if p.row["user_id"] is not None})
        found: dict[str, dict[str, Any]] = {}
        unsubscribed: set[str] = set()
        async with self.k.store.connect() as conn:
            if user_ids:
                for u in (await conn.execute(sa.select(users).where(
                        users.c.id.in_(user_ids)))).mappings():
                    found[u["id"]] = {**(u["attributes"] or {}), "id": u["id"],
                                      "email": u["email"]}
                unsubscribed = set((await conn.execute(sa.select(subscriptions.c.user_id).where(
                    subscriptions.c.user_id.in_(user_ids),
                    subscriptions.c.topic == MARKETING_TOPIC,
                    subscriptions.c.unsubscribed_at.is_not(None)))).scalars())
            for p in prepared:
                p.user = found.get(str(p.row["user_id"]), {})
                p.address = str(p.row["to_address"] or p.user.get("email") or "")
            addresses = sorted({_bare(p.address) for p in prepared if p.address})
            suppressed: dict[str, str] = {}
            if addresses:
                result = await conn.execute(
                    sa.select(suppressions.c.address, suppressions.c.reason).where(
                        suppressions.c.address.in_(addresses)))
                suppressed = {str(a): str(r) for a, r in result.all()}
        for p in prepared:
            row = p.row
            if not p.address:
                p.status, p.error = "failed", "no email address for this message's user"
                continue
            try:
                parse_address(p.address, "recipient")  # before any work
            except InvalidAddress as exc:
                p.status, p.error = "failed", str(exc)
                continue
            reason = suppressed.get(_bare(p.address))
            if reason is not None:
                p.status, p.error = "suppressed", f"address suppressed ({reason})"
            elif row["kind"] in MARKETING_KINDS and row["user_id"] in unsubscribed:
                p.status, p.error = "suppressed", "user unsubscribed from marketing messages"
            else:
                data: dict[str, Any] = dict(row["data"] or {})
                if row["user_id"] is not None:
                    for cp in self.context_providers:
                        data.update(await cp.context_for(str(row["user_id"]), data))
                p.data = data

    def _render_all(self, prepared: list[_Prepared]) -> None:
        todo = [p for p in prepared if p.status is None]
        jobs: list[RenderJob] = []
        unsubs: list[str] = []
        for p in todo:
            job, unsub = self._job(p)
            jobs.append(job)
            unsubs.append(unsub)
        results: list[RenderResult] | None = None
        if self.render_pool is not None and jobs:
            try:
                results = self.render_pool.render_many(jobs)
            except RenderPoolError as exc:  # rendered here instead; the pool restarts
                log.warning("delivery.render_pool_failed", error=str(exc))
        if results is None:
            results = render_jobs(self.renderer, jobs)
        for p, result, unsub in zip(todo, results, unsubs, strict=True):
            if isinstance(result, TemplateError):
                p.status, p.error = "failed", str(result)
                continue
            try:
                p.message = self._build(p, result, unsub)
            except InvalidAddress as exc:
                p.status, p.error = "failed", str(exc)

    def _job(self, p: _Prepared) -> tuple[RenderJob, str]:
        """The template and context to render ``p`` with, and its unsubscribe URL."""
        row, user, data, address = p.row, dict(p.user), p.data, p.address
        unsub = ""
        if row["kind"] in MARKETING_KINDS:
            claims: dict[str, str | int] = {"m": int(row["id"])}
            if row["user_id"] is not None:
                claims["u"] = str(row["user_id"])
            else:
                claims["a"] = _bare(address)
            unsub = f"{self.public_url}/u/{self.signer.sign('u', claims)}"
        if row["kind"] == "test":  # a test send fills what it lacks with sample values
            sample = sample_user()
            sample.update(user or {"email": address})
            user = sample
        context = {**data, "data": data, "user": user,
                   "message": {"id": row["id"], "kind": row["kind"],
                               "campaign": row["campaign"], "template": row["template"]},
                   "unsubscribe_url": unsub}
        return (str(row["template"]), context), unsub

    def _build(self, p: _Prepared, rendered: Rendered, unsub: str) -> OutgoingMessage:
        row, address = p.row, p.address
        html = rendered.html
        if self._tracks(row):
            mid = int(row["id"])
            html = add_tracking(
                html,
                lambda url: f"{self.public_url}/t/c/{self.signer.sign('c', {'m': mid, 'l': url})}",
                f"{self.public_url}/t/o/{self.signer.sign('o', {'m': mid})}")
        ecfg = self.k.config.email
        return build_message(MessageParts(
            row_id=int(row["id"]), kind=row["kind"], sender=ecfg.from_, to=address,
            subject=rendered.subject, html=html, text=rendered.text,
            message_id=row["message_id"] or make_message_id(int(row["id"]), self._sender_domain),
            date=self.k.clock.now(), reply_to=ecfg.reply_to, unsubscribe_url=unsub,
            unsubscribe_mailto=ecfg.unsubscribe_mailto))

    def _tracks(self, row: Mapping[str, Any]) -> bool:
        tpl = self.k.app.templates.get(row["template"])
        if tpl is not None and tpl.track is not None:
            return tpl.track
        camp = self.k.app.campaigns.get(row["campaign"] or "")
        if camp is not None and camp.track is not None:
            return camp.track
        return self.k.config.email.track

    async def _record(self, prepared: list[_Prepared], results: dict[int, SendResult]) -> None:
        now = self.k.clock.now()
        ecfg = self.k.config.email
        events: list[tuple[str, dict[str, object]]] = []
        async with self.k.store.begin() as conn:
            for p in prepared:
                row = p.row
                base: dict[str, object] = {"message": row["id"], "user_id": row["user_id"],
                                           "template": row["template"]}
                values: dict[str, object] = {"updated_at": now}
                if p.message is not None:
                    values["message_id"] = p.message.message_id
                res = results.get(id(p))
                if res is None and p.status == "retry":
                    res = SendResult(ok=False, error=p.error, transient=True)
                if res is None:
                    status, error = p.status or "failed", p.error
                elif res.ok:
                    status, error = "sent", None
                    values.update(sent_at=now, provider_message_id=res.provider_message_id)
                elif res.transient and row["attempts"] < ecfg.max_attempts:
                    status, error = "queued", res.error
                    delay = backoff(row["attempts"], ecfg.retry_base, ecfg.retry_max, self.rng)
                    values["next_attempt_at"] = now + _seconds(delay)
                    base["retry_in_s"] = round(delay, 3)
                else:
                    status, error = "failed", res.error
                    if res.suppress and p.message is not None:
                        await conn.execute(self.k.store.insert_ignore(suppressions).values(
                            address=_bare(p.message.to), reason="bounce",
                            source=self.provider_name, detail=(res.error or "")[:1000],
                            created_at=now))
                        events.append(("address.suppressed", {
                            "address": _bare(p.message.to), "reason": "bounce",
                            "source": self.provider_name}))
                values.update(status=status, last_error=error)
                await conn.execute(sa.update(messages).where(
                    messages.c.id == row["id"], messages.c.status == "sending").values(**values))
                kind = "retrying" if status == "queued" else status
                events.append((f"message.{kind}", {**base, "error": error} if error else base))
        for kind, data in events:
            self._count(kind, data)
            self.k.bus.publish(kind, **data)

    def _count(self, kind: str, data: Mapping[str, object]) -> None:
        if not kind.startswith("message."):
            return
        status = kind.removeprefix("message.")
        self.k.metrics.inc("segflow_messages_total", status=status)
        key = {"retrying": "retried"}.get(status, status)
        if key in self._totals:
            self._totals[key] += 1
        c = self._counters
        if status == "sent":
            c.sent += 1
            self._recent.append((self.k.clock.monotonic(), 1))
            log.info("message.sent", **data)
        elif status == "failed":
            c.failed += 1
            log.warning("message.failed", **data)
        elif status == "retrying":
            c.transient += 1
            log.info("message.retrying", **data)
        else:
            log.info(f"message.{status}", **data)

    # -- statistics and actions ------------------------------------------------------

    async def _refresh_depth(self) -> None:
        async with self.k.store.connect() as conn:
            rows = (await conn.execute(sa.select(messages.c.status, sa.func.count())
                                       .group_by(messages.c.status))).all()
        self._depth = {str(s): int(n) for s, n in rows}

    def statistics(self) -> DeliveryStatistics:
        now = self.k.clock.monotonic()
        self._recent = [(t, n) for t, n in self._recent if now - t <= 60.0]
        window = max(1.0, now - self._recent[0][0]) if self._recent else 60.0
        c = self._counters
        return DeliveryStatistics(
            outbox=dict(self._depth), sent=self._totals["sent"], failed=self._totals["failed"],
            suppressed=self._totals["suppressed"], retried=self._totals["retried"],
            unknown=self._totals["unknown"],
            sent_per_second=sum(n for _, n in self._recent) / window,
            providers=(ProviderStatistics(
                name=self.provider_name, plugin=str(self.options.get("plugin",
                                                                     self.provider_name)),
                sent=c.sent, failed=c.failed, transient_errors=c.transient, batches=c.batches,
                in_flight=c.in_flight, rate=self.rate, concurrency=self.concurrency),),
        )

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
        status = "queued"
        with anyio.move_on_after(TEST_WAIT):
            while status not in FINAL:
                await anyio.sleep(0.05)
                status = await self._status_of(msg_id)
        return {"message": msg_id, "status": status}

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

    async def _status_of(self, mid: int) -> str:
        async with self.k.store.connect() as conn:
            return str((await conn.execute(
                sa.select(messages.c.status).where(messages.c.id == mid))).scalar_one())


def _bare(address: str) -> str:
    """The lower-cased addr-spec of ``Name <a@b>`` (the suppression list's key)."""
    return email.utils.parseaddr(address)[1].strip().lower() or address.strip().lower()


def _seconds(s: float) -> dt.timedelta:
    return dt.timedelta(seconds=s)
