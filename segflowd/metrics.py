"""Prometheus text exposition of the daemon's counters and gauges.

Parts of the daemon own their numbers (``statistics()``); the registry holds counters
for events that happen and collectors that read gauges at scrape time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

__all__ = ["Metrics", "Sample"]

Sample = tuple[str, dict[str, str], float]  # name, labels, value
Collector = Callable[[], Iterable[Sample]]


def _number(value: float) -> str:
    """A sample value: integers exactly (``{:g}`` would print 1234567 as 1.23457e+06)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Counters (monotonic) and collectors (gauges read when scraped)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._collectors: list[Collector] = []

    def describe(self, name: str, kind: str, help_text: str) -> None:
        self._help[name] = (kind, help_text)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def value(self, name: str, **labels: str) -> float:
        return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def collect(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def render(self) -> str:
        samples: list[Sample] = [(n, dict(lbl), v) for (n, lbl), v in self._counters.items()]
        for collector in self._collectors:
            samples.extend(collector())
        by_name: dict[str, list[Sample]] = {}
        for s in samples:
            by_name.setdefault(s[0], []).append(s)
        lines: list[str] = []
        for name in sorted(by_name):
            kind, help_text = self._help.get(name, ("untyped", ""))
            if help_text:
                lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for _, labels, value in by_name[name]:
                lbl = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
                num = _number(float(value))
                lines.append(f"{name}{{{lbl}}} {num}" if lbl else f"{name} {num}")
        return "\n".join(lines) + "\n"
