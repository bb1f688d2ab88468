"""Outcomes: what became of each message of a batch, recorded, published and counted.

A send result (or the status decided while preparing) becomes the row's new status in one
transaction: ``sent``; ``queued`` again after a :func:`backoff` delay for a transient error
below ``[email] max_attempts``; ``failed`` otherwise, suppressing the address where the
provider says so (a bounce); or the ``failed`` / ``suppressed`` decided without sending.
Each outcome is then published as ``message.<status>`` (``message.retrying`` for a retry),
logged and counted; the counts make the :class:`DeliveryStatistics`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Mapping, Sequence

import sqlalchemy as sa
import structlog

from ..kernel import Kernel
from ..providers import SendResult
from ..schema import messages, suppressions
from .prepare import Prepared, bare_address

__all__ = ["DeliveryStatistics", "Outcomes", "ProviderCounters", "ProviderStatistics",
           "backoff"]

log = structlog.get_logger("segflowd.delivery")


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before retry number ``attempt`` (1-based): capped doubling, half jittered."""
    delay = min(cap, base * (2.0 ** max(0, attempt - 1)))
    return delay / 2 + rng.random() * delay / 2


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
class ProviderCounters:
    """Running counts for the provider's :class:`ProviderStatistics`."""

    sent: int = 0
    failed: int = 0
    transient: int = 0
    batches: int = 0
    in_flight: int = 0


class Outcomes:
    """Records a batch's outcomes for the delivery service and keeps its counts."""

    def __init__(self, k: Kernel, *, provider_name: str, rng: random.Random) -> None:
        self.k = k
        self.provider_name = provider_name
        self.rng = rng
        self.counters = ProviderCounters()
        self.totals = {"sent": 0, "failed": 0, "suppressed": 0, "retried": 0, "unknown": 0}
        self.depth: dict[str, int] = {}
        self.recent: list[tuple[float, int]] = []  # (monotonic, sent) per batch
        m = k.metrics
        m.describe("segflow_messages_total", "counter", "messages by outcome")
        m.describe("segflow_outbox_messages", "gauge", "outbox rows by status")
        m.collect(lambda: [("segflow_outbox_messages", {"status": s}, float(n))
                           for s, n in self.depth.items()])

    async def record(self, prepared: Sequence[Prepared],
                     results: Mapping[int, SendResult]) -> None:
        """Store, publish and count each outcome; ``results`` is keyed by ``id(prepared)``."""
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
                            address=bare_address(p.message.to), reason="bounce",
                            source=self.provider_name, detail=(res.error or "")[:1000],
                            created_at=now))
                        events.append(("address.suppressed", {
                            "address": bare_address(p.message.to), "reason": "bounce",
                            "source": self.provider_name}))
                values.update(status=status, last_error=error)
                await conn.execute(sa.update(messages).where(
                    messages.c.id == row["id"], messages.c.status == "sending").values(**values))
                kind = "retrying" if status == "queued" else status
                events.append((f"message.{kind}", {**base, "error": error} if error else base))
        for kind, data in events:
            self.count(kind, data)
            self.k.bus.publish(kind, **data)

    def count(self, kind: str, data: Mapping[str, object]) -> None:
        if not kind.startswith("message."):
            return
        status = kind.removeprefix("message.")
        self.k.metrics.inc("segflow_messages_total", status=status)
        key = {"retrying": "retried"}.get(status, status)
        if key in self.totals:
            self.totals[key] += 1
        c = self.counters
        if status == "sent":
            c.sent += 1
            self.recent.append((self.k.clock.monotonic(), 1))
            log.info("message.sent", **data)
        elif status == "failed":
            c.failed += 1
            log.warning("message.failed", **data)
        elif status == "retrying":
            c.transient += 1
            log.info("message.retrying", **data)
        else:
            log.info(f"message.{status}", **data)

    # -- statistics ------------------------------------------------------------------

    async def refresh_depth(self) -> None:
        async with self.k.store.connect() as conn:
            rows = (await conn.execute(sa.select(messages.c.status, sa.func.count())
                                       .group_by(messages.c.status))).all()
        self.depth = {str(s): int(n) for s, n in rows}

    def statistics(self, *, plugin: str, rate: float, concurrency: int) -> DeliveryStatistics:
        now = self.k.clock.monotonic()
        self.recent = [(t, n) for t, n in self.recent if now - t <= 60.0]
        window = max(1.0, now - self.recent[0][0]) if self.recent else 60.0
        c = self.counters
        return DeliveryStatistics(
            outbox=dict(self.depth), sent=self.totals["sent"], failed=self.totals["failed"],
            suppressed=self.totals["suppressed"], retried=self.totals["retried"],
            unknown=self.totals["unknown"],
            sent_per_second=sum(n for _, n in self.recent) / window,
            providers=(ProviderStatistics(
                name=self.provider_name, plugin=plugin,
                sent=c.sent, failed=c.failed, transient_errors=c.transient, batches=c.batches,
                in_flight=c.in_flight, rate=rate, concurrency=concurrency),),
        )


def _seconds(s: float) -> dt.timedelta:
    return dt.timedelta(seconds=s)
