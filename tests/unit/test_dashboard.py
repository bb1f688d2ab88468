"""deploy/grafana-dashboard.json: valid JSON Grafana imports, over metrics /metrics exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def exposed() -> tuple[set[str], set[str]]:
    """(metric names the package's code exposes, those of them that are histograms)."""
    names: set[str] = set()
    histograms: set[str] = set()
    for path in (ROOT / "segflowd").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        found = set(re.findall(r'"((?:segflow|process)_[a-z0-9_]+)"', text))
        names |= found
        if ".histogram(" in text:
            histograms |= {n for n in found if n.endswith("_seconds")}
    return names, histograms


def expressions() -> list[str]:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(dash["schemaVersion"], int)
    assert dash["title"]
    assert dash["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["type"] == "row" or panel["targets"], panel["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    for expr in expressions():
        assert set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"} <= variables, expr


def test_dashboard_references_only_metrics_the_daemon_exposes() -> None:
    names, histograms = exposed()
    assert "segflow_ingest_request_seconds" in histograms  # the scan does find them
    used: set[str] = set()
    for expr in expressions():
        used |= set(re.findall(r"\b((?:segflow|process)_[a-z0-9_]+)", expr))
    unknown = set()
    for name in used:
        base = next((name.removesuffix(s) for s in HISTOGRAM_PARTS if name.endswith(s)), None)
        if name not in names and base not in histograms:
            unknown.add(name)
    assert not unknown


def test_every_latency_histogram_has_a_quantile_panel() -> None:
    exprs = "\n".join(expressions())
    for name in ("segflow_ingest_request_seconds", "segflow_group_commit_seconds",
                 "segflow_segment_entry_seconds", "segflow_flow_step_lateness_seconds",
                 "segflow_provider_send_seconds"):
        for q in ("0.5", "0.99"):
            assert re.search(rf"histogram_quantile\({q}, sum by \(le[^)]*\) "
                             rf"\(rate\({name}_bucket\{{", exprs), (name, q)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "segflow_outbox_messages", "segflow_provider_up"):
        assert name in exprs
