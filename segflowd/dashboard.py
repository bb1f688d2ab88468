"""``[dashboard]`` in segflow.toml: when segflow-tui's dashboard panels turn to a warning.

The daemon reads these thresholds and sends them in every ``status`` reply (as
``dashboard``), so every viewer of one daemon warns at the same points. A panel warns
when its value reaches (``>=``) its threshold. Every threshold must be positive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .errors import ConfigError

__all__ = ["DashboardConfig", "check_dashboard"]


@dataclasses.dataclass(frozen=True)
class DashboardConfig:
    store_latency_ms: float = 100.0  # the store's answer to the health ping
    outbox_depth: int = 10_000  # messages queued, claimed or sending
    oldest_queued_s: float = 600.0  # age of the oldest queued message
    lateness_s: float = 5.0  # how late the timer wheel fires its waits
    failures_per_hour: int = 10  # failed messages and instances in the last hour
    failed_instances: int = 1  # instances failed or diverged, live in the store
    campaign_failures_per_hour: int = 5  # one campaign's failures in the last hour


def check_dashboard(c: DashboardConfig, error: Callable[[str, str], ConfigError]) -> None:
    """Raise ``error(key, message)`` for the first threshold that is not positive."""
    for f in dataclasses.fields(c):
        if getattr(c, f.name) <= 0:
            raise error(f"dashboard.{f.name}", "must be a positive number")
