"""Histograms and process metrics in the Prometheus exposition, and the provider send
histogram of :func:`segflowd.delivery.sending.send_batch`."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

import pytest

from segflowd.delivery.sending import SEND_SECONDS, send_batch
from segflowd.metrics import (
    COMMIT_BUCKETS,
    INGEST_BUCKETS,
    LATENESS_BUCKETS,
    PROVIDER_SEND_BUCKETS,
    SEGMENT_ENTRY_BUCKETS,
    Metrics,
    process_samples,
)
from segflowd.providers import OutgoingMessage, SendError, SendResult


def test_histogram_renders_cumulative_buckets_sum_and_count() -> None:
    m = Metrics()
    h = m.histogram("req_seconds", "request latency", (0.1, 1.0, 5.0))
    for value in (0.05, 0.1, 0.7, 3.0, 60.0):  # 0.1 sits in le="0.1": bounds are inclusive
        h.observe(value)
    text = m.render()
    assert "# HELP req_seconds request latency\n# TYPE req_seconds histogram\n" in text
    assert ('req_seconds_bucket{le="0.1"} 2\nreq_seconds_bucket{le="1.0"} 3\n'
            'req_seconds_bucket{le="5.0"} 4\nreq_seconds_bucket{le="+Inf"} 5\n'
            "req_seconds_sum 63.85\nreq_seconds_count 5\n") in text
    assert h.count() == 5


def test_histogram_keeps_one_series_per_label_set_with_le_last() -> None:
    m = Metrics()
    h = m.histogram("send_seconds", "sends", (1.0,))
    h.observe(0.5, provider="ses")
    h.observe(2.0, provider="ses")
    h.observe(0.25, provider='a"b')
    text = m.render()
    assert 'send_seconds_bucket{provider="ses",le="1.0"} 1\n' in text
    assert 'send_seconds_bucket{provider="ses",le="+Inf"} 2\n' in text
    assert 'send_seconds_count{provider="ses"} 2\n' in text
    assert 'send_seconds_sum{provider="ses"} 2.5\n' in text
    assert 'send_seconds_count{provider="a\\"b"} 1\n' in text
    assert h.count(provider="ses") == 2
    assert h.count(provider="none") == 0


def test_a_histogram_without_observations_is_exposed_as_its_type_only() -> None:
    m = Metrics()
    m.histogram("idle_seconds", "nothing yet", (1.0,))
    assert m.render() == "# HELP idle_seconds nothing yet\n# TYPE idle_seconds histogram\n"


def test_histogram_is_one_per_name_and_bounds_are_checked() -> None:
    m = Metrics()
    first = m.histogram("x_seconds", "x", (0.5, 1.0))
    assert m.histogram("x_seconds", "x", (0.5, 1.0)) is first
    with pytest.raises(ValueError, match="already has bounds"):
        m.histogram("x_seconds", "x", (0.5, 2.0))
    for bad in ((), (1.0, 0.5), (1.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="bucket bounds"):
            m.histogram(f"bad{len(bad)}_seconds", "bad", bad)


@pytest.mark.parametrize("bounds", [INGEST_BUCKETS, COMMIT_BUCKETS, SEGMENT_ENTRY_BUCKETS,
                                    LATENESS_BUCKETS, PROVIDER_SEND_BUCKETS])
def test_the_daemons_bucket_bounds_are_valid(bounds: tuple[float, ...]) -> None:
    Metrics().histogram("b_seconds", "b", bounds).observe(0.001)


def test_process_metrics_are_exposed_once_with_their_types() -> None:
    m = Metrics()
    m.collect_process()
    m.collect_process()
    text = m.render()
    assert text.count("# TYPE process_cpu_seconds_total counter\n") == 1
    expected = {"process_cpu_seconds_total", "process_resident_memory_bytes",
                "process_start_time_seconds", "process_max_fds"}
    if sys.platform.startswith("linux"):
        expected |= {"process_virtual_memory_bytes", "process_open_fds"}
    values = {name: float(v) for name, v in re.findall(r"^(process_\w+) (\S+)$", text, re.M)}
    assert expected <= set(values)
    assert all(v > 0 for v in values.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_process_open_fds_counts_a_newly_opened_file() -> None:
    def fds() -> float:
        return dict((n, v) for n, _, v in process_samples())["process_open_fds"]

    before = fds()
    with open(__file__, "rb"):
        assert fds() == before + 1


MESSAGE = OutgoingMessage(id=1, message_id="m1@x", sender="a@x", to="b@x", subject="s",
                          mime=b"")


class Answering:
    max_batch = 10

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def send(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        if self.error is not None:
            raise self.error
        return [SendResult(ok=True, provider_message_id="p")] * len(messages)


@pytest.mark.anyio
async def test_send_batch_observes_every_call_by_provider_whatever_its_outcome() -> None:
    m = Metrics()
    assert (await send_batch(Answering(), "ses", [MESSAGE], metrics=m))[0].ok
    await send_batch(Answering(SendError("down", maybe_sent=False)), "ses", [MESSAGE],
                     metrics=m)
    await send_batch(Answering(RuntimeError("bug")), "smtp", [MESSAGE], metrics=m)
    text = m.render()
    assert f"# TYPE {SEND_SECONDS} histogram\n" in text
    assert f'{SEND_SECONDS}_count{{provider="ses"}} 2\n' in text
    assert f'{SEND_SECONDS}_count{{provider="smtp"}} 1\n' in text
    # without metrics (a caller that has none) it sends all the same
    assert (await send_batch(Answering(), "ses", [MESSAGE]))[0].ok


def test_a_bound_observer_feeds_its_label_set() -> None:
    m = Metrics()
    h = m.histogram("api_seconds", "by api", (1.0,))
    native = h.bind(api="native")
    native(0.5)
    native(3.0)
    h.observe(0.2, api="native")
    assert h.count(api="native") == 3
    assert 'api_seconds_bucket{api="native",le="1.0"} 2\n' in m.render()
