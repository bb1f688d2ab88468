"""The dashboard's thresholds: ``[dashboard]`` in segflow.toml, and the panels that use them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from segflow_tui.dashboard import panels, thresholds
from segflow_tui.testing import CAMPAIGNS, STATUS
from segflowd.config import load_config
from segflowd.dashboard import DashboardConfig
from segflowd.errors import ConfigError

MINIMAL = """\
[daemon]
app = "app.py:app"

[providers.outbox]
plugin = "outbox"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "segflow.toml"
    path.write_text(MINIMAL + text, encoding="utf-8")
    return path


def test_dashboard_thresholds_have_defaults_and_are_read_from_file_and_environment(
        tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), {}).dashboard == DashboardConfig()
    path = write(tmp_path, "[dashboard]\nlateness_s = 2.5\nfailures_per_hour = 3\n")
    got = load_config(path, {"SEGFLOW_DASHBOARD_OUTBOX_DEPTH": "500"}).dashboard
    assert (got.lateness_s, got.failures_per_hour, got.outbox_depth) == (2.5, 3, 500)
    assert got.store_latency_ms == DashboardConfig.store_latency_ms


@pytest.mark.parametrize(("text", "key", "message"), [
    ("[dashboard]\noutbox_depth = 0\n", "dashboard.outbox_depth", "must be a positive number"),
    ("[dashboard]\nlateness_s = \"5s\"\n", "dashboard.lateness_s", "must be a number"),
    ("[dashboard]\nlatenes_s = 5\n", "dashboard.latenes_s", "unknown key"),
])
def test_a_bad_threshold_names_its_key_and_line(tmp_path: Path, text: str, key: str,
                                                 message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), {})
    assert info.value.key == key
    assert message in str(info.value)
    assert info.value.line == 7  # the key's line, after MINIMAL's five


def test_panels_use_the_daemons_thresholds_and_say_an_unreachable_store() -> None:
    st = copy.deepcopy(STATUS)
    st["dashboard"] = {"lateness_s": 0.01, "failed_instances": "x"}  # a bad one: default
    st["store"] = {**st["store"], "healthy": False}  # type: ignore[dict-item]
    assert thresholds(st) == DashboardConfig(lateness_s=0.01)
    views = {v.key: v for v in panels(st, CAMPAIGNS)}
    assert views["timers"].warnings == ("late ≥ 0.01 s",)
    assert views["store"].warnings == ("store unreachable",)
    assert "UNREACHABLE" in views["store"].body.plain
    assert views["instances"].warnings == ()
    del st["health"]  # an older daemon: no health data, nothing claimed
    assert {v.key for v in panels(st, []) if v.warnings} == {"store", "timers"}
