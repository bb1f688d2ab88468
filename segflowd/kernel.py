"""What every part of the daemon is built with: one object, passed explicitly (no globals)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping

from .app import Segflow
from .bus import Bus
from .clock import Clock
from .config import Config
from .metrics import Metrics
from .store import Store

__all__ = ["Action", "Kernel"]

# An admin action the control socket can invoke: JSON-able arguments in, JSON-able out.
# It raises SegflowError (or ValueError/KeyError) with a sentence for a bad request.
Action = Callable[[Mapping[str, object]], Awaitable[object]]


@dataclasses.dataclass
class Kernel:
    """The shared, long-lived components of one segflowd process."""

    config: Config
    app: Segflow
    store: Store
    clock: Clock
    bus: Bus
    metrics: Metrics
    # Filled by the services as they are built; read by the control socket and /metrics.
    # Action names: "campaign.pause", "campaign.resume", "segment.refresh", "email.test",
    # "message.retry", "instance.terminate", "instance.restart", "instance.wake",
    # "audiences.list", "audiences.pick", "broadcast.launch". Statistics names: "ingest",
    # "segments", "flows", "wheel", "delivery", "sources"; each returns a frozen dataclass.
    actions: dict[str, Action] = dataclasses.field(default_factory=dict)
    stats: dict[str, Callable[[], object]] = dataclasses.field(default_factory=dict)
