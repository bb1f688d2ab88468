"""The outcall worker: it makes the calls of ``rt.webhook`` steps (``channel='webhook'`` rows).

A webhook row goes ``queued → sending → sent | failed``. The dispatcher claims due rows
(``next_attempt_at <= now``) in one short transaction (``sending``, ``attempts + 1``, a
claim token), makes each call with at most ``[webhooks] concurrency`` in flight
(:func:`~segflowd.delivery.outcalls.call`), and records its outcome in ONE transaction
with the wake of the flow waiting on it (:func:`~segflowd.flows.webhookwait.record_outcome`):

* answered → ``sent``, with ``response`` = ``{"status", "headers", "json", "truncated"}``;
* retry → ``queued`` again after a backoff with jitter (or the receiver's ``Retry-After``),
  until ``[webhooks] max_attempts`` calls were made, then ``failed``;
* refused by ``[webhooks] allow`` → ``failed`` at once.

Webhooks are at-least-once, unlike email: a row found ``sending`` at start was in flight
when the process died, and is queued again with its dedupe key, so the repeat carries the
same ``Idempotency-Key`` and a receiver can drop it. A call cut short by a drain goes back
to ``queued`` the same way.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import httpx
import sqlalchemy as sa
import structlog
from anyio.abc import TaskGroup, TaskStatus
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import StoreUnavailable
from ..flows.webhookwait import PREFIX, record_outcome
from ..http import Router
from ..kernel import Kernel
from ..schema import flow_instances, messages
from .groupwrite import GroupWrite
from .outcalls import Outcome, address_refusal, backoff, call
from .pinned import pinned_transport

__all__ = ["OutcallService", "OutcallStatistics"]

log = structlog.get_logger("segflowd.webhooks")

POLL = 5.0  # seconds between looks for due rows when nothing woke the dispatcher
RECORD_RETRY = 1.0  # seconds between attempts to record an outcome while the store is down
RELEASE_TIMEOUT = 5.0  # seconds a cancelled call spends putting its row back in the queue
CALLS = "segflow_webhook_calls_total"
_Item = tuple[Mapping[str, Any], Outcome, bool, "str | None"]  # what _write_in takes


@dataclasses.dataclass(frozen=True)
class OutcallStatistics:
    in_flight: int
    answered: int
    retried: int
    failed: int  # failed for good: refused, or out of attempts


class OutcallService:
    """The webhook worker (a :class:`~segflowd.daemon.Service` and an ``OutboxWaker``).

    ``on_final(instance, now)`` is told, after the commit, that an instance's webhook is
    final and its wake is due now (the flow service's ``schedule``), so it resumes at once.
    """

    name = "webhooks"

    def __init__(self, k: Kernel, *, on_final: Callable[[int, dt.datetime], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self.k = k
        self.on_final = on_final
        self.rng = rng or random.Random()
        self._wake = anyio.Event()
        self._stopping = False
        self._done = anyio.Event()
        self._in_flight = 0
        self._counts = {"answered": 0, "retry": 0, "failed": 0}
        self._group = GroupWrite(self._write_many)
        k.metrics.describe(CALLS, "counter", "rt.webhook attempts by outcome "
                           "(answered, retry, refused, failed)")
        k.stats["webhooks"] = self.statistics

    # -- the service -----------------------------------------------------------------

    def register_routes(self, router: Router) -> None:
        """No routes: the worker only calls out."""

    def wake(self) -> None:
        self._wake.set()

    def _client(self) -> httpx.AsyncClient:
        cfg = self.k.config.webhooks
        limits = httpx.Limits(max_connections=cfg.concurrency,
                              max_keepalive_connections=cfg.concurrency)
        # No redirects (a 3xx is an answer: a redirect could lead past the allow-list),
        # no proxy from the environment (the allow-list judges where calls go).
        # Connections go to the addresses judged at connect time (delivery.pinned).
        return httpx.AsyncClient(
            transport=pinned_transport(address_refusal(cfg), limits=limits),
            follow_redirects=False, trust_env=False)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.recover()
        try:
            async with self._client() as client, anyio.create_task_group() as tg:
                task_status.started()
                await self._dispatch(client, tg)
        finally:
            self._done.set()

    async def run_once(self) -> int:
        """Claim the calls due now (up to ``concurrency``), make and record them; how many
        (the Simulation steps the worker this way, between moments)."""
        rows = await self._claim(self.k.config.webhooks.concurrency)
        if rows:
            async with self._client() as client, anyio.create_task_group() as tg:
                for row in rows:
                    self._in_flight += 1
                    tg.start_soon(self._one, client, row)
        return len(rows)

    async def drain(self) -> None:
        self._stopping = True
        self._wake.set()
        await self._done.wait()

    def statistics(self) -> OutcallStatistics:
        c = self._counts
        return OutcallStatistics(self._in_flight, c["answered"], c["retry"], c["failed"])

    # -- recovery --------------------------------------------------------------------

    async def recover(self) -> int:
        """Rows left ``sending`` (or ``claimed``) by a dead process go back to ``queued``:
        the receiver may have had the call, and the repeat carries the same key."""
        m = messages.c
        now = self.k.clock.now()
        async with self.k.store.begin() as conn:
            res = await conn.execute(sa.update(messages).where(
                m.channel == "webhook", m.status.in_(["sending", "claimed"])).values(
                status="queued", claim=None, next_attempt_at=now, updated_at=now))
        n = int(res.rowcount or 0)
        if n:
            log.warning("webhook.requeued", calls=n,
                        reason="in flight when the process stopped (called again, same key)")
        return n

    # -- dispatching -----------------------------------------------------------------

    async def _dispatch(self, client: httpx.AsyncClient, tg: TaskGroup) -> None:
        limit = self.k.config.webhooks.concurrency
        while not self._stopping:
            claimed = 0
            free = limit - self._in_flight
            # A claim is a commit: under load, one per quarter of the slots, not per call.
            if free >= max(1, limit // 4) or (free > 0 and self._in_flight == 0):
                try:
                    rows = await self._claim(free)
                except Exception as exc:  # the store went away: keep going, try later
                    log.warning("webhook.claim_failed", error=f"{type(exc).__name__}: {exc}")
                    rows = []
                for row in rows:
                    self._in_flight += 1
                    tg.start_soon(self._one, client, row)
                claimed = len(rows)
            if claimed == 0 or self._in_flight >= limit - max(1, limit // 4) + 1:
                await self._idle()
        # the drain: let the calls in flight finish and be recorded (the daemon bounds it)

    async def _idle(self) -> None:
        """Until woken (a step queued a call, a call ended) or the next row falls due."""
        seconds = POLL
        limit = self.k.config.webhooks.concurrency
        if limit - self._in_flight >= max(1, limit // 4):  # else: woken as calls end
            try:
                async with self.k.store.connect() as conn:
                    due = (await conn.execute(sa.select(sa.func.min(messages.c.next_attempt_at))
                                              .where(messages.c.channel == "webhook",
                                                     messages.c.status == "queued"))).scalar()
                if due is not None:
                    seconds = min(POLL, max(0.0, (due - self.k.clock.now()).total_seconds()))
            except Exception as exc:
                log.warning("webhook.poll_failed", error=f"{type(exc).__name__}: {exc}")
        if seconds <= 0:
            self._wake = anyio.Event()
            return
        async with anyio.create_task_group() as tg:
            async def sleeper() -> None:
                await self.k.clock.sleep(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(sleeper)
            await self._wake.wait()
            tg.cancel_scope.cancel()
        self._wake = anyio.Event()

    async def _claim(self, size: int) -> list[Mapping[str, Any]]:
        m = messages.c
        now = self.k.clock.now()
        claim = secrets.token_hex(16)
        async with self.k.store.begin() as conn:
            due = [dict(r) for r in (await conn.execute(
                sa.select(m.id, m.instance_id, m.dedupe_key, m.data, m.attempts, m.campaign,
                          m.user_id)
                .where(m.channel == "webhook", m.status == "queued", m.next_attempt_at <= now)
                .order_by(m.next_attempt_at, m.id).limit(size)
                .with_for_update(skip_locked=True))).mappings()]
            if not due:
                return []
            rows = await self._still_awaited(conn, due, now)
            if not rows:
                return []
            await conn.execute(sa.update(messages).where(
                m.id.in_([r["id"] for r in rows]), m.status == "queued").values(
                status="sending", attempts=m.attempts + 1, claim=claim, updated_at=now))
        return [dict(r, attempts=int(r["attempts"]) + 1, claim=claim) for r in rows]

    async def _still_awaited(self, conn: AsyncConnection, rows: Sequence[Mapping[str, Any]],
                             now: dt.datetime) -> list[Mapping[str, Any]]:
        """The rows whose flow still waits for their call; the others (the instance was
        terminated, restarted, exited or forgotten since) fail here, never called."""
        fi = flow_instances.c
        ids = sorted({int(r["instance_id"]) for r in rows if r["instance_id"] is not None})
        waiting = {(int(i), str(w)) for i, w in await conn.execute(
            sa.select(fi.id, fi.wait_event).where(fi.id.in_(ids), fi.status == "waiting"))
        } if ids else set()
        keep, gone = [], []
        for r in rows:
            if r["instance_id"] is None or (int(r["instance_id"]),
                                            PREFIX + str(r["dedupe_key"])) in waiting:
                keep.append(r)
            else:
                gone.append(int(r["id"]))
        if gone:
            m = messages.c
            await conn.execute(sa.update(messages).where(
                m.id.in_(gone), m.status == "queued").values(
                status="failed", next_attempt_at=None, updated_at=now,
                last_error="not called: the flow no longer waits for it (its instance "
                           "ended or was restarted)"))
            log.info("webhook.abandoned", messages=len(gone))
        return keep

    # -- one call --------------------------------------------------------------------

    async def _one(self, client: httpx.AsyncClient, row: Mapping[str, Any]) -> None:
        try:
            data = row["data"] if isinstance(row["data"], dict) else {}
            key = str(row["dedupe_key"] or f"message:{row['id']}")
            outcome = await call(client, data, key=key, cfg=self.k.config.webhooks,
                                 now=self.k.clock.now())
            await self._record(row, outcome)
        except Exception as exc:  # our fault, not the receiver's: the call fails for good
            # (left `sending`, it would be called again at every start, and fail again)
            error = f"the call failed in segflowd: {type(exc).__name__}: {exc}"
            log.error("webhook.error", message=row["id"], error=error)
            try:
                await self._record(row, Outcome("failed", error=error[:500]))
            except Exception as again:  # left sending: the next start queues it again
                log.error("webhook.record_failed", message=row["id"],
                          error=f"{type(again).__name__}: {again}")
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT):
                await self._release(row)
            raise
        finally:
            self._in_flight -= 1
            self._wake.set()  # a slot is free

    async def _release(self, row: Mapping[str, Any]) -> None:
        """A call cut short (a drain, an error of ours): queued again, same key."""
        m = messages.c
        try:
            async with self.k.store.begin() as conn:
                await conn.execute(sa.update(messages).where(
                    m.id == row["id"], m.claim == row["claim"], m.status == "sending").values(
                    status="queued", claim=None, updated_at=self.k.clock.now()))
        except Exception as exc:  # left sending: the next start queues it again
            log.warning("webhook.release_failed", message=row["id"], error=str(exc)[:300])

    async def _record(self, row: Mapping[str, Any], outcome: Outcome) -> None:
        cfg = self.k.config.webhooks
        attempts = int(row["attempts"])
        final = outcome.kind != "retry" or attempts >= cfg.max_attempts
        label = outcome.kind if not final or outcome.kind != "retry" else "failed"
        url = str((row["data"] or {}).get("url", ""))
        error = outcome.error
        if outcome.kind == "retry" and final:
            error = f"failed after {attempts} attempt{'s' if attempts != 1 else ''}: {error}"
        while True:
            try:
                woke = await self._write(row, outcome, final, error)
                break
            except StoreUnavailable as exc:
                # Known outcome: left `sending` it would be called again at the next start.
                log.warning("webhook.record_retry", message=row["id"], error=str(exc)[:300])
                await self.k.clock.sleep(RECORD_RETRY)
        self._counts["answered" if outcome.kind == "answered" else
                     ("failed" if final else "retry")] += 1
        self.k.metrics.inc(CALLS, outcome=label)
        status = "sent" if outcome.kind == "answered" else ("failed" if final else "retrying")
        self.k.metrics.inc("segflow_channel_messages_total", channel="webhook", status=status)
        event = {"answered": "webhook.answered", "refused": "webhook.refused"}.get(
            outcome.kind, "webhook.failed" if final else "webhook.retry")
        fields: dict[str, object] = {
            "message": row["id"], "instance": row["instance_id"], "campaign": row["campaign"],
            "user_id": row["user_id"], "url": url.split("?", 1)[0], "attempt": attempts}
        if outcome.response is not None:
            fields["status"] = outcome.response.get("status")
        if error is not None:
            fields["error"] = error
        (log.info if outcome.kind == "answered" else log.warning)(event, **fields)
        self.k.bus.publish(event, **fields)
        # Also when the write found nothing to wake: a retried write after a lost COMMIT
        # reply did wake it (its wake is in the store); scheduling an instance that is not
        # waiting is harmless, and the flow then resumes at once, not at the next load.
        if (woke or final) and self.on_final is not None and row["instance_id"] is not None:
            self.on_final(int(row["instance_id"]), self.k.clock.now())

    async def _write(self, row: Mapping[str, Any], outcome: Outcome, final: bool,
                     error: str | None) -> bool:
        """The outcome in one transaction with the flow's wake; whether a flow was woken.
        Outcomes that come while another is being written share the next transaction
        (a group commit: one commit per call would cap the calls at the store's commits)."""
        return await self._group.submit((row, outcome, final, error))

    async def _write_many(self, items: Sequence[_Item]) -> list[bool]:
        async with self.k.store.begin() as conn:
            return [await self._write_in(conn, *item) for item in items]

    async def _write_in(self, conn: AsyncConnection, row: Mapping[str, Any], outcome: Outcome,
                        final: bool, error: str | None) -> bool:
        m = messages.c
        now = self.k.clock.now()
        mine = sa.update(messages).where(m.id == row["id"], m.claim == row["claim"],
                                         m.status == "sending")
        if row["user_id"] is not None:  # forgotten meanwhile: nothing of the answer is kept
            mine = mine.where(m.user_id == row["user_id"])
        if not final:
            delay = backoff(int(row["attempts"]), outcome.retry_after,
                            self.k.config.webhooks, self.rng)
            await conn.execute(mine.values(
                status="queued", claim=None, last_error=error, updated_at=now,
                next_attempt_at=now + dt.timedelta(seconds=delay)))
            return False
        if outcome.kind == "answered":
            done = await conn.execute(mine.values(
                status="sent", claim=None, response=outcome.response, last_error=None,
                sent_at=now, updated_at=now))
            stored: dict[str, object] = {"value": outcome.response}
        else:
            done = await conn.execute(mine.values(
                status="failed", claim=None, last_error=error, updated_at=now))
            stored = {"error": error or "the webhook failed"}
        if done.rowcount != 1:
            if row["user_id"] is not None:  # forgotten mid-call: ended, nothing of it kept
                await conn.execute(sa.update(messages).where(
                    m.id == row["id"], m.claim == row["claim"], m.status == "sending",
                    m.user_id.is_(None)).values(status="failed", claim=None, updated_at=now,
                                                last_error="the user was forgotten"))
            return False  # no longer ours (a message.retry, a forget): nothing to wake
        return await record_outcome(
            conn, instance=row["instance_id"], dedupe_key=str(row["dedupe_key"] or ""),
            outcome=stored, now=now)
