"""The dashboard's panels, as pure data: what each shows and whether it warns.

A panel warns when a value reaches its threshold from the ``dashboard`` part of the
status reply (segflow.toml ``[dashboard]``, read by the daemon, so every viewer of one
daemon agrees); a status from a daemon that sends none uses the same defaults. A warning
is given in words (the panel's subtitle and a line in its body), and the app colours
the panel too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from rich.text import Text

from segflowd.dashboard import DashboardConfig

from .render import value

__all__ = ["PANELS", "PanelView", "error_details", "panels", "thresholds"]

# id -> title, in the order they are laid out: three columns, then two full-width rows.
PANELS = {"store": "store", "ingest": "ingest", "sending": "sending", "outbox": "outbox",
          "timers": "timers", "instances": "instances",
          "failures": "failures in the last hour (e: full texts)", "campaigns": "campaigns"}
ERROR_WIDTH = 100  # characters of an error text shown in the panel; `e` shows it whole


@dataclasses.dataclass(frozen=True)
class PanelView:
    key: str
    body: Text
    warnings: tuple[str, ...] = ()

    @property
    def subtitle(self) -> str:
        return "WARNING" if self.warnings else "ok"


def thresholds(status: Mapping[str, object]) -> DashboardConfig:
    """The daemon's thresholds; the defaults for any it does not send."""
    sent = _map(status.get("dashboard"))
    known = {f.name for f in dataclasses.fields(DashboardConfig)}
    args = {k: v for k, v in sent.items() if k in known and isinstance(v, int | float)}
    return DashboardConfig(**args)  # type: ignore[arg-type]


def panels(status: Mapping[str, object],
           campaigns: Sequence[Mapping[str, object]]) -> list[PanelView]:
    t = thresholds(status)
    health = _map(status.get("health"))
    return [_store(status, t), _ingest(status), _sending(status), _outbox(status, health, t),
            _timers(status, t), _instances(health, t), _failures(health, t),
            _campaigns(campaigns, health, t)]


def error_details(status: Mapping[str, object]) -> Text:
    """The last hour's top errors in full, for the detail pane."""
    errors = _list(_map(status.get("health")).get("top_errors"))
    if not errors:
        return Text("no failures in the last hour")
    out = Text()
    for e in errors:
        out.append(f"{value(e.get('count'))} times ({value(e.get('where'))}s)\n",
                   style="bold")
        out.append(f"{e.get('error')}\n\n")
    return out


def _store(st: Mapping[str, object], t: DashboardConfig) -> PanelView:
    store = _map(st.get("store"))
    ping = _num(store.get("last_ping_ms"))
    warn = []
    if not store.get("healthy"):
        warn.append("store unreachable")
    elif ping is not None and ping >= t.store_latency_ms:
        warn.append(f"ping ≥ {t.store_latency_ms:g} ms")
    body = _lines(
        f"{value(store.get('dialect'))}, "
        + ("healthy" if store.get("healthy") else "UNREACHABLE"),
        f"ping {_ms(ping)}  (warn at {t.store_latency_ms:g} ms)",
        f"connections {value(store.get('checked_out'))}/{value(store.get('pool_size'))}"
        f" in use, schema {value(store.get('schema_version'))}")
    return PanelView("store", body, tuple(warn))


def _ingest(st: Mapping[str, object]) -> PanelView:
    rates, bus = _map(st.get("rates")), _map(st.get("bus"))
    return PanelView("ingest", _lines(
        f"{value(rates.get('ingest_per_s'))} events/s now, "
        f"peak {_peak(st, 'ingest_per_s')}",
        f"bus: {value(bus.get('subscribers'))} subscribers, "
        f"{value(bus.get('dropped'))} dropped"))


def _sending(st: Mapping[str, object]) -> PanelView:
    rates = _map(st.get("rates"))
    return PanelView("sending", _lines(
        f"{value(rates.get('sent_per_s'))} emails/s now, peak {_peak(st, 'sent_per_s')}",
        f"failing {value(rates.get('failed_per_s'))}/s"))


def _outbox(st: Mapping[str, object], health: Mapping[str, object],
            t: DashboardConfig) -> PanelView:
    box = _map(st.get("outbox"))
    depth = sum(int(_num(v) or 0) for v in box.values())
    oldest = _num(health.get("oldest_queued_s"))
    warn = []
    if depth >= t.outbox_depth:
        warn.append(f"depth ≥ {t.outbox_depth}")
    if oldest is not None and oldest >= t.oldest_queued_s:
        warn.append(f"oldest ≥ {_age(t.oldest_queued_s)}")
    lines = [" · ".join(f"{k} {value(box.get(k, 0))}" for k in ("queued", "claimed", "sending")),
             f"depth {depth}, oldest queued {_age(oldest) if oldest is not None else '-'}"]
    delivery = _map(_map(st.get("stats")).get("delivery"))
    for p in _list(delivery.get("providers")):
        if p.get("outage_since"):
            warn.append(f"provider {p.get('name')} down since {p.get('outage_since')}")
    return PanelView("outbox", _lines(*lines), tuple(warn))


def _timers(st: Mapping[str, object], t: DashboardConfig) -> PanelView:
    wheel = _map(st.get("wheel"))
    late = _num(wheel.get("lateness_s"))
    warn = (f"late ≥ {t.lateness_s:g} s",) if late is not None and late >= t.lateness_s else ()
    return PanelView("timers", _lines(
        f"{value(wheel.get('size'))} waits on the wheel",
        f"lateness {value(late)} s, peak {_peak(st, 'lateness_s')} s "
        f"(warn at {t.lateness_s:g} s)"), warn)


def _failures(health: Mapping[str, object], t: DashboardConfig) -> PanelView:
    n = int(_num(health.get("failures_1h")) or 0)
    warn = (f"{n} failures ≥ {t.failures_per_hour}",) if n >= t.failures_per_hour else ()
    lines = [f"{n} failed messages and instances"]
    for e in _list(health.get("top_errors")):
        text = " ".join(str(e.get("error")).split())
        cut = text if len(text) <= ERROR_WIDTH else text[:ERROR_WIDTH - 1] + "…"
        lines.append(f"{value(e.get('count')):>5} {cut}")
    return PanelView("failures", _lines(*lines), warn)


def _instances(health: Mapping[str, object], t: DashboardConfig) -> PanelView:
    inst = _map(health.get("instances"))
    failed, diverged = int(_num(inst.get("failed")) or 0), int(_num(inst.get("diverged")) or 0)
    bad = failed + diverged
    warn = (f"{bad} need attention",) if bad >= t.failed_instances else ()
    return PanelView("instances", _lines(
        f"{failed} failed, {diverged} diverged",
        "restart or terminate them (a: admin action)" if bad else "none stuck"), warn)


def _campaigns(campaigns: Sequence[Mapping[str, object]], health: Mapping[str, object],
               t: DashboardConfig) -> PanelView:
    per = _map(health.get("campaigns"))
    body = Text(f"{'campaign':<16}{'state':<8}{'live':>7}{'in/h':>7}{'fail/h':>7}\n",
                style="dim")
    warn = []
    for c in campaigns:
        name = str(c.get("name"))
        h = _map(per.get(name))
        fails = int(_num(h.get("failures_1h")) or 0)
        state = "paused" if c.get("paused") else "active" if c.get("defined") else "removed"
        line = (f"{name[:15]:<16}{state:<8}{value(c.get('live')):>7}"
                f"{value(h.get('entries_1h', 0)):>7}{fails:>7}")
        waiting = c.get("waiting_entries")
        if c.get("paused") and waiting is not None:
            line += f"  {value(waiting)} waiting"
        style = ""
        if fails >= t.campaign_failures_per_hour:
            warn.append(f"{name}: {fails} failures ≥ {t.campaign_failures_per_hour}")
            style = "bold red"
        body.append(line + "\n", style=style)
    if not campaigns:
        body.append("no campaigns\n")
    body.rstrip()
    return PanelView("campaigns", body, tuple(warn))


def _lines(*lines: str) -> Text:
    return Text("\n".join(lines))


def _peak(st: Mapping[str, object], field: str) -> str:
    vals = [_num(h.get(field)) for h in _list(st.get("history"))]
    return value(max((v for v in vals if v is not None), default=0.0))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:g} ms"


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _map(v: object) -> Mapping[str, object]:
    return v if isinstance(v, Mapping) else {}


def _list(v: object) -> list[Mapping[str, object]]:
    return [x for x in v if isinstance(x, Mapping)] if isinstance(v, list) else []
