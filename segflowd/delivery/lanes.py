"""The outbox's lanes: each provider's share of the messages, its pace and its workers.

Transactional mail (``transaction``, ``test``) goes through ``[email] provider``;
marketing mail (``campaign``, ``broadcast``) through ``[email] provider_marketing`` when
that names another provider, so a complaint spike, a rate limit or an outage on a
newsletter's provider never holds up a password reset. Each lane claims only its own
kinds of message, at its provider's ``rate``/``burst`` (a :class:`TokenBucket`), with
``concurrency`` workers of its own; without ``provider_marketing`` there is one lane,
for every kind.

SMS (``[sms] provider``) is a lane of its own too, claiming only ``channel = "sms"``
rows (the mail lanes claim only ``email`` ones), with the same pace, circuit and
outcomes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Mapping, Sequence

import structlog

from ..clock import Clock
from ..kernel import Kernel
from ..providers import (
    MARKETING_KINDS,
    Provider,
    ProviderContext,
    SendResult,
    SmsProvider,
    load_provider,
    load_sms_provider,
)
from .outcomes import Outcomes, ProviderStatistics

__all__ = ["TRANSACTIONAL_KINDS", "Circuit", "Lane", "TokenBucket", "build_lanes"]

log = structlog.get_logger("segflowd.delivery")

DEFAULT_CONCURRENCY = 1  # parallel send calls per provider
DEFAULT_RATE = 0.0  # messages per second per provider; 0 means unlimited
TRANSACTIONAL_KINDS = frozenset({"transaction", "test"})
PROBE_FIRST = 5.0  # seconds from an outage to the first probe of the provider
PROBE_MAX = 300.0  # seconds: the longest wait between two probes
PROBE_BATCH = 1  # messages a probe sends (the rest stay queued)
MAX_BATCH = 1 << 30  # a closed circuit admits the provider's own max_batch


class Circuit:
    """A provider's outage: while it is open the lane claims nothing but, now and then,
    one message to probe the provider with (after 5 s, doubling to 5 min; one probe at a
    time, whatever the lane's concurrency); the first send the provider answers (sent,
    or refused for the message's own sake) closes it. A batch opens it when every
    message of it met an outage, or none got an answer at all (a provider that hangs:
    those are ``unknown``, and no more batches are handed to it). Each change is logged
    (``provider.outage``, ``provider.recovered``) and shown (:meth:`Lane.statistics`)."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.since: dt.datetime | None = None  # when the outage began (None: up)
        self.error = ""
        self.probes = 0  # probes that found it still down
        self.outages = 0  # outages since start
        self._retry_at = 0.0  # monotonic seconds: the next probe
        self._delay = PROBE_FIRST
        self._probing = False  # a probe is out: nobody else is let through

    @property
    def open(self) -> bool:
        return self.since is not None

    def wait(self, mono: float) -> float:
        """Seconds until the next probe may go (0: the provider is up, or it is due)."""
        return max(0.0, self._retry_at - mono) if self.open else 0.0

    def admit(self, mono: float) -> int | None:
        """How many messages a batch may take now (None: none, the provider is down);
        while the circuit is open, one caller at a time gets a probe's few."""
        if not self.open:
            return MAX_BATCH
        if self._probing or mono < self._retry_at:
            return None
        self._probing = True
        return PROBE_BATCH

    def unanswered(self, mono: float) -> None:
        """The probe admitted by :meth:`admit` sent nothing (no message was due, or the
        batch failed before the provider): the next probe waits its turn again."""
        if self._probing:
            self._probing = False
            self._retry_at = mono + self._delay

    def answered(self, results: Sequence[SendResult], now: dt.datetime, mono: float) -> bool:
        """Open, keep open or close the circuit on a batch's answers; whether the batch
        met an outage as a whole (only then are its outage answers held)."""
        probe, self._probing = self._probing, False
        if not results:
            return False
        down = [r for r in results if r.outage and not r.maybe_sent]
        hung = all(r.maybe_sent for r in results)
        if len(down) == len(results) or hung:
            self.error = (down[0].error if down else results[0].error) or "no answer"
            if self.since is None:
                self.since, self.outages, self._delay = now, self.outages + 1, PROBE_FIRST
                log.warning("provider.outage", provider=self.provider, error=self.error,
                            retry_in_s=self._delay, hint="messages stay queued; no attempt "
                            "is spent (a batch that got no answer is unknown)")
                self._retry_at = mono + self._delay
            elif probe:  # only a probe's answer pushes the next one further
                self.probes += 1
                self._delay = min(PROBE_MAX, self._delay * 2)
                self._retry_at = mono + self._delay
                log.info("provider.still_down", provider=self.provider, error=self.error,
                         retry_in_s=self._delay)
            return bool(down)
        answered = any(r.ok or not (r.outage or r.maybe_sent) for r in results)
        if answered and self.since is not None:
            log.warning("provider.recovered", provider=self.provider,
                        down_s=round((now - self.since).total_seconds(), 3),
                        probes=self.probes)
            self.since, self.error, self.probes = None, "", 0
        return False


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


@dataclasses.dataclass
class Lane:
    """One provider and the kinds of message it sends (None: every kind)."""

    name: str  # the provider's [providers.NAME]
    options: Mapping[str, object]
    kinds: frozenset[str] | None
    rate: float
    burst: float
    concurrency: int
    bucket: TokenBucket
    outcomes: Outcomes  # its counts; the outbox totals are shared by every lane
    circuit: Circuit
    _provider: Provider | SmsProvider | None = None
    channel: str = "email"  # the messages.channel it claims: email | sms

    @property
    def plugin(self) -> str:
        return str(self.options.get("plugin", self.name))

    def provider(self, k: Kernel) -> Provider | SmsProvider:
        """The lane's provider, loaded on first use (a plugin that cannot load raises)."""
        if self._provider is None:
            ctx = ProviderContext(self.name, self.options, k.config.base_dir)
            self._provider = (load_sms_provider(ctx) if self.channel == "sms"
                              else load_provider(ctx))
        return self._provider

    @property
    def loaded(self) -> Provider | SmsProvider | None:
        return self._provider

    def statistics(self) -> ProviderStatistics:
        return self.outcomes.provider_statistics(
            plugin=self.plugin, rate=self.rate, concurrency=self.concurrency,
            outage_since=self.circuit.since, outage_error=self.circuit.error)


def build_lanes(k: Kernel, rng: random.Random,
                given: Mapping[str, Provider | SmsProvider] | None = None) -> list[Lane]:
    """The lanes of ``k``'s config: transactional first (the primary), then marketing
    when ``[email] provider_marketing`` names another provider, then SMS when ``[sms]
    provider`` names one. ``given`` providers (by name) are used instead of loading their
    plugins."""
    ecfg = k.config.email
    marketing = ecfg.provider_marketing
    split = bool(marketing) and marketing != ecfg.provider
    lanes: list[Lane] = []
    sms = k.config.sms.provider
    for name, kinds, channel in (
            (ecfg.provider, TRANSACTIONAL_KINDS if split else None, "email"),
            *([(marketing, MARKETING_KINDS, "email")] if split else []),
            *([(sms, None, "sms")] if sms else [])):
        table = k.config.providers.get(name)
        options: dict[str, object] = dict(table.options) if table else {}
        rate = float(str(options.get("rate", DEFAULT_RATE)))
        burst = float(str(options.get("burst", max(1.0, rate))))
        outcomes = Outcomes(k, provider_name=name, rng=rng,
                            shared=lanes[0].outcomes if lanes else None,
                            max_attempts=k.config.sms.max_attempts if channel == "sms" else None,
                            channel=channel)
        lanes.append(Lane(
            name=name, options=options, kinds=kinds, rate=rate, burst=burst,
            concurrency=max(1, int(str(options.get("concurrency", DEFAULT_CONCURRENCY)))),
            bucket=TokenBucket(rate, burst, k.clock), outcomes=outcomes,
            circuit=Circuit(name), _provider=(given or {}).get(name), channel=channel))
    k.metrics.describe("segflow_channel_messages_total", "counter",
                       "message outcomes by channel (email, sms, webhook) and status")
    k.metrics.describe("segflow_provider_up", "gauge",
                       "1 while the provider answers, 0 during an outage")
    k.metrics.collect(lambda: [("segflow_provider_up", {"provider": lane.name},
                                0.0 if lane.circuit.open else 1.0) for lane in lanes])
    return lanes
