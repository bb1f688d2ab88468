"""Comparing a campaign's variants: conversion rates and a two-proportion z-test.

Each variant is compared with the campaign's control: the variant named ``control`` if
there is one, else the first by name. The test is the pooled two-proportion z-test,
two-sided (``p = erfc(|z| / sqrt 2)``); it needs messages sent on both sides and some
conversions and non-conversions between them, else its p-value is ``None``. A variant is
the campaign's ``winner`` when it converts better than the control with a p-value below
:data:`SIGNIFICANCE` (the best such one, if several).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

__all__ = ["CONTROL", "SIGNIFICANCE", "VariantRow", "compare_variants", "two_proportion_p"]

CONTROL = "control"  # the variant name taken as the control when there is one
SIGNIFICANCE = 0.05  # a p-value below this makes a better variant the winner


def two_proportion_p(x1: int, n1: int, x2: int, n2: int) -> float | None:
    """The two-sided p-value that ``x1/n1`` and ``x2/n2`` differ (pooled z-test); None
    when it cannot be computed (an empty side, or nothing or everything converted)."""
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return None
    z = (x1 / n1 - x2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))


@dataclasses.dataclass(frozen=True)
class VariantRow:
    """One variant of a campaign: messages sent, conversions and the test against control.

    ``variant`` is None for messages queued outside any experiment; those are shown but
    never tested."""

    campaign: str
    variant: str | None
    queued: int
    sent: int
    converted: int
    conversion_rate: float | None  # converted / sent
    control: bool  # this is the variant the others are tested against
    p_value: float | None  # against the control (None for the control itself)
    winner: bool


def _rate(x: int, n: int) -> float | None:
    return round(x / n, 6) if n else None


def compare_variants(totals: Iterable[tuple[str, str | None, int, int, int]]
                     ) -> list[VariantRow]:
    """``(campaign, variant, queued, sent, converted)`` totals as :class:`VariantRow`\\ s,
    by campaign then variant (None first)."""
    by_campaign: dict[str, list[tuple[str | None, int, int, int]]] = {}
    for campaign, variant, queued, sent, converted in totals:
        by_campaign.setdefault(campaign, []).append((variant, queued, sent, converted))
    out: list[VariantRow] = []
    for campaign in sorted(by_campaign):
        rows = sorted(by_campaign[campaign], key=lambda r: (r[0] is not None, r[0] or ""))
        out.extend(_campaign(campaign, rows))
    return out


def _campaign(campaign: str, rows: Sequence[tuple[str | None, int, int, int]]
              ) -> list[VariantRow]:
    named = [r for r in rows if r[0] is not None]
    control = next((r for r in named if r[0] == CONTROL), named[0] if named else None)
    tested: dict[str | None, float | None] = {}
    best: tuple[float, str] | None = None
    if control is not None and len(named) > 1:
        base = control[3] / control[2] if control[2] else 0.0
        for variant, _, sent, converted in named:
            if variant == control[0]:
                continue
            p = two_proportion_p(converted, sent, control[3], control[2])
            tested[variant] = p
            rate = converted / sent if sent else 0.0
            if p is not None and p < SIGNIFICANCE and rate > base and variant is not None and (
                    best is None or rate > best[0]):
                best = (rate, variant)
    return [VariantRow(
        campaign=campaign, variant=variant, queued=queued, sent=sent, converted=converted,
        conversion_rate=_rate(converted, sent),
        control=control is not None and len(named) > 1 and variant == control[0],
        p_value=None if tested.get(variant) is None else round(float(tested[variant] or 0), 6),
        winner=best is not None and variant == best[1])
        for variant, queued, sent, converted in rows]
