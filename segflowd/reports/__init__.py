"""Campaign reports: counts and rates per send position, template, variant and day, and
each variant's conversion rate tested against the control (docs/guides/operating.md)."""

from __future__ import annotations

from .query import COUNTS, RATES, Report, ReportRow, report, sum_rows
from .stats import SIGNIFICANCE, VariantRow, compare_variants, two_proportion_p

__all__ = ["COUNTS", "RATES", "SIGNIFICANCE", "Report", "ReportRow", "VariantRow",
           "compare_variants", "report", "sum_rows", "two_proportion_p"]
