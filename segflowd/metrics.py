"""Prometheus text exposition of the daemon's counters, gauges and histograms.

Parts of the daemon own their numbers (``statistics()``); the registry holds counters
for events that happen, histograms of latencies, and collectors that read gauges at
scrape time. Every registry also reports the process (``process_*``, read from
``/proc/self`` on Linux, from :mod:`resource` elsewhere).

The renderer is our own rather than ``prometheus_client``'s: one registry, one
exposition, and a histogram observation is a bisect into fixed bounds and two
increments (no per-observation lock, no label-object allocation on the hot path).
"""

from __future__ import annotations

import bisect
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "COMMIT_BUCKETS",
    "INGEST_BUCKETS",
    "LATENESS_BUCKETS",
    "PROVIDER_SEND_BUCKETS",
    "SEGMENT_ENTRY_BUCKETS",
    "Histogram",
    "Metrics",
    "Sample",
    "process_samples",
]

Sample = tuple[str, dict[str, str], float]  # name, labels, value
Collector = Callable[[], Iterable[Sample]]

# Histogram bucket upper bounds, all in seconds (``+Inf`` is implied).
INGEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0, 10.0)  # seconds: an ingest request, parse to reply
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0, 10.0)  # seconds: a request's wait for its group commit
SEGMENT_ENTRY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                         30.0, 60.0, 300.0)  # seconds: event received -> entry applied
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                    900.0, 3600.0)  # seconds: a wait's step run after its due time
PROVIDER_SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                         30.0, 60.0)  # seconds: one provider call (a batch of messages)


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


def _labels(labels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels)


class _Series:
    """One label set's buckets: ``counts[i]`` observations in bucket ``i`` (not cumulative;
    the last is ``+Inf``) and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self, n: int) -> None:
        self.counts = [0] * (n + 1)
        self.total = 0.0


class Histogram:
    """A Prometheus histogram with fixed bucket bounds (seconds, or whatever the name says).

    :meth:`observe` is a bisect and two increments under the GIL: the daemon observes
    from its event loop, and a scrape racing an observation at worst reads a ``_count``
    one behind a bucket (Prometheus tolerates that).
    """

    def __init__(self, name: str, bounds: Sequence[float]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)) or math.isinf(bounds[-1]):
            raise ValueError(f"histogram {name}: bucket bounds must be finite, "
                             f"increasing and unique, got {list(bounds)!r}")
        self.name = name
        self.bounds = tuple(float(b) for b in bounds)
        self._series: dict[tuple[tuple[str, str], ...], _Series] = {}
        self._new = threading.Lock()  # only taken to add a label set

    def observe(self, value: float, **labels: str) -> None:
        series = self._get(tuple(sorted(labels.items())) if labels else ())
        series.counts[bisect.bisect_left(self.bounds, value)] += 1
        series.total += value

    def bind(self, **labels: str) -> Callable[[float], None]:
        """``observe`` for one label set, looked up once (for a hot path with fixed labels)."""
        series, bounds = self._get(tuple(sorted(labels.items()))), self.bounds

        def observe(value: float) -> None:
            series.counts[bisect.bisect_left(bounds, value)] += 1
            series.total += value

        return observe

    def _get(self, key: tuple[tuple[str, str], ...]) -> _Series:
        series = self._series.get(key)
        if series is None:
            with self._new:
                series = self._series.setdefault(key, _Series(len(self.bounds)))
        return series

    def count(self, **labels: str) -> int:
        """Observations so far for ``labels`` (tests and the TUI)."""
        series = self._series.get(tuple(sorted(labels.items())))
        return 0 if series is None else sum(series.counts)

    def render(self) -> list[str]:
        lines: list[str] = []
        les = [repr(b) for b in self.bounds] + ["+Inf"]  # 1.0, as prometheus_client
        for key, series in sorted(self._series.items()):
            running = 0
            for le, n in zip(les, list(series.counts), strict=True):
                running += n
                lbl = _labels((*key, ("le", le)))
                lines.append(f"{self.name}_bucket{{{lbl}}} {running}")
            lbl = _labels(key)
            braces = f"{{{lbl}}}" if lbl else ""
            lines.append(f"{self.name}_sum{braces} {_number(series.total)}")
            lines.append(f"{self.name}_count{braces} {running}")
        return lines


class Metrics:
    """Counters (monotonic), histograms, and collectors (gauges read when scraped)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._histograms: dict[str, Histogram] = {}
        self._collectors: list[Collector] = []
        self._process = False

    def describe(self, name: str, kind: str, help_text: str) -> None:
        self._help[name] = (kind, help_text)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def value(self, name: str, **labels: str) -> float:
        return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def histogram(self, name: str, help_text: str, bounds: Sequence[float]) -> Histogram:
        """The histogram ``name`` (made on first call; the same one after, bounds alike)."""
        with self._lock:
            found = self._histograms.get(name)
            if found is None:
                found = self._histograms[name] = Histogram(name, bounds)
                self._help[name] = ("histogram", help_text)
            elif found.bounds != tuple(float(b) for b in bounds):
                raise ValueError(f"histogram {name} already has bounds {found.bounds!r}")
            return found

    def collect(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def collect_process(self) -> None:
        """Report ``process_*`` metrics of this process (once, however often called)."""
        if not self._process:
            self._process = True
            for name, (kind, help_text) in _PROCESS_HELP.items():
                self.describe(name, kind, help_text)
            self.collect(process_samples)

    def render(self) -> str:
        samples: list[Sample] = [(n, dict(lbl), v) for (n, lbl), v in self._counters.items()]
        for collector in self._collectors:
            samples.extend(collector())
        by_name: dict[str, list[Sample]] = {}
        for s in samples:
            by_name.setdefault(s[0], []).append(s)
        lines: list[str] = []
        for name in sorted({*by_name, *self._histograms}):
            kind, help_text = self._help.get(name, ("untyped", ""))
            if help_text:
                lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            if name in self._histograms:
                lines += self._histograms[name].render()
                continue
            for _, labels, value in by_name[name]:
                lbl = _labels(sorted(labels.items()))
                num = _number(float(value))
                lines.append(f"{name}{{{lbl}}} {num}" if lbl else f"{name} {num}")
        return "\n".join(lines) + "\n"


# -- process -------------------------------------------------------------------------

_PROCESS_HELP = {
    "process_cpu_seconds_total": ("counter", "user and system CPU time spent, in seconds"),
    "process_resident_memory_bytes": ("gauge", "resident memory size in bytes"),
    "process_virtual_memory_bytes": ("gauge", "virtual memory size in bytes"),
    "process_open_fds": ("gauge", "open file descriptors"),
    "process_max_fds": ("gauge", "the limit on open file descriptors"),
    "process_start_time_seconds": ("gauge", "start time of the process, in seconds since "
                                            "the Unix epoch"),
}
_START = time.time()  # the fallback start time: when the daemon's code was loaded


def _linux() -> dict[str, float]:
    """The ``process_*`` values from ``/proc/self`` (raises OSError where there is none)."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    # the fields after the command name, which may hold spaces and parentheses
    fields = stat[stat.rindex(b")") + 2:].split()
    ticks = float(os.sysconf("SC_CLK_TCK"))
    out = {
        "process_cpu_seconds_total": (int(fields[11]) + int(fields[12])) / ticks,
        "process_virtual_memory_bytes": float(fields[20]),
        "process_resident_memory_bytes": float(int(fields[21]) * os.sysconf("SC_PAGE_SIZE")),
        "process_open_fds": float(len(os.listdir("/proc/self/fd"))),
    }
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                out["process_start_time_seconds"] = int(line.split()[1]) + int(fields[19]) / ticks
                break
    return out


def _portable() -> dict[str, float]:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    # ru_maxrss is the peak, in KiB on Linux and BSD, bytes on macOS: the best there is
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"process_cpu_seconds_total": usage.ru_utime + usage.ru_stime,
            "process_resident_memory_bytes": float(rss)}


def process_samples() -> list[Sample]:
    """This process's ``process_*`` metrics, as far as the platform tells them."""
    try:
        values = _linux()
    except (OSError, ValueError, IndexError):
        values = _portable()
    values.setdefault("process_start_time_seconds", _START)
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            values["process_max_fds"] = float(soft)
    except (ImportError, OSError, ValueError):
        pass
    return [(name, {}, value) for name, value in values.items()]
