"""The outbox's lanes: each provider's share of the messages, its pace and its workers.

Transactional mail (``transaction``, ``test``) goes through ``[email] provider``;
marketing mail (``campaign``, ``broadcast``) through ``[email] provider_marketing`` when
that names another provider, so a complaint spike, a rate limit or an outage on a
newsletter's provider never holds up a password reset. Each lane claims only its own
kinds of message, at its provider's ``rate``/``burst`` (a :class:`TokenBucket`), with
``concurrency`` workers of its own; without ``provider_marketing`` there is one lane,
for every kind.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping

from ..clock import Clock
from ..kernel import Kernel
from ..providers import MARKETING_KINDS, Provider, ProviderContext, load_provider
from .outcomes import Outcomes, ProviderStatistics

__all__ = ["TRANSACTIONAL_KINDS", "Lane", "TokenBucket", "build_lanes"]

DEFAULT_CONCURRENCY = 1  # parallel send calls per provider
DEFAULT_RATE = 0.0  # messages per second per provider; 0 means unlimited
TRANSACTIONAL_KINDS = frozenset({"transaction", "test"})


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
    _provider: Provider | None = None

    @property
    def plugin(self) -> str:
        return str(self.options.get("plugin", self.name))

    def provider(self, k: Kernel) -> Provider:
        """The lane's provider, loaded on first use (a plugin that cannot load raises)."""
        if self._provider is None:
            self._provider = load_provider(ProviderContext(self.name, self.options,
                                                           k.config.base_dir))
        return self._provider

    @property
    def loaded(self) -> Provider | None:
        return self._provider

    def statistics(self) -> ProviderStatistics:
        return self.outcomes.provider_statistics(plugin=self.plugin, rate=self.rate,
                                                 concurrency=self.concurrency)


def build_lanes(k: Kernel, rng: random.Random,
                given: Mapping[str, Provider] | None = None) -> list[Lane]:
    """The lanes of ``k``'s config: transactional first (the primary), then marketing
    when ``[email] provider_marketing`` names another provider. ``given`` providers (by
    name) are used instead of loading their plugins."""
    ecfg = k.config.email
    marketing = ecfg.provider_marketing
    split = bool(marketing) and marketing != ecfg.provider
    lanes: list[Lane] = []
    for name, kinds in ((ecfg.provider, TRANSACTIONAL_KINDS if split else None),
                        *([(marketing, MARKETING_KINDS)] if split else [])):
        table = k.config.providers.get(name)
        options: dict[str, object] = dict(table.options) if table else {}
        rate = float(str(options.get("rate", DEFAULT_RATE)))
        burst = float(str(options.get("burst", max(1.0, rate))))
        outcomes = Outcomes(k, provider_name=name, rng=rng,
                            shared=lanes[0].outcomes if lanes else None)
        lanes.append(Lane(
            name=name, options=options, kinds=kinds, rate=rate, burst=burst,
            concurrency=max(1, int(str(options.get("concurrency", DEFAULT_CONCURRENCY)))),
            bucket=TokenBucket(rate, burst, k.clock), outcomes=outcomes,
            _provider=(given or {}).get(name)))
    return lanes
