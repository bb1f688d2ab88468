"""Prometheus text exposition."""

from __future__ import annotations

from segflowd.metrics import Metrics


def test_counters_render_with_help_type_and_sorted_labels() -> None:
    m = Metrics()
    m.describe("segflow_events_total", "counter", "events ingested")
    m.inc("segflow_events_total", api="native")
    m.inc("segflow_events_total", 2, api="native")
    m.inc("segflow_events_total", api="segment")
    text = m.render()
    assert "# HELP segflow_events_total events ingested\n" in text
    assert "# TYPE segflow_events_total counter\n" in text
    assert 'segflow_events_total{api="native"} 3\n' in text
    assert 'segflow_events_total{api="segment"} 1\n' in text
    assert m.value("segflow_events_total", api="native") == 3


def test_large_counts_keep_every_digit_and_fractions_stay_exact() -> None:
    m = Metrics()
    m.inc("big", 1234567)
    m.collect(lambda: [("ratio", {}, 0.125), ("inf", {}, float("inf"))])
    text = m.render()
    assert "\nbig 1234567\n" in "\n" + text
    assert "ratio 0.125\n" in text
    assert "inf +Inf\n" in text


def test_collectors_are_read_at_every_scrape_and_label_values_escaped() -> None:
    m = Metrics()
    state = {"n": 1.0}
    m.describe("depth", "gauge", "queue depth")
    m.collect(lambda: [("depth", {"q": 'a"b\\c'}, state["n"])])
    assert 'depth{q="a\\"b\\\\c"} 1\n' in m.render()
    state["n"] = 5
    assert 'depth{q="a\\"b\\\\c"} 5\n' in m.render()
    assert "# TYPE depth gauge" in m.render()


def test_undescribed_metric_is_untyped() -> None:
    m = Metrics()
    m.inc("x")
    assert m.render() == "# TYPE x untyped\nx 1\n"
