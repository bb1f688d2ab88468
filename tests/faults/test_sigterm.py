"""SIGTERM under load: the drain ends within ``[daemon] drain_timeout``, exit 0, and
nothing acknowledged is lost."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from fault_harness import (
    Load,
    Sink,
    campaign_app,
    check_sink_against_store,
    log_events,
    missing_acknowledged,
    smtp_config,
    smtp_env,
    snapshot,
    wait_for,
)

pytestmark = pytest.mark.slow

DRAIN_TIMEOUT = 5.0  # [daemon] drain_timeout as the harness writes it
EXIT_SLACK = 5.0  # seconds beyond the drain for closing the store and the interpreter
SMTP_TIMEOUT = 5.0  # the smtp provider's timeout as smtp_config writes it


def test_sigterm_under_load_drains_in_bound_and_exits_0(
        start_daemon, sqlite_url: str, sink: Sink, tmp_path: Path) -> None:
    """SIGTERM while requests, flows and sends are in flight: exit 0 within the drain bound
    (the drain is not cut short), every 2xx write stored, no send left ``sending``."""
    sink.delay = 0.05  # a send is in flight most of the time
    d = start_daemon(store_url=sqlite_url, app=campaign_app(tmp_path / "templates"),
                     extra=smtp_config(sink.port),
                     env={**smtp_env(), "SEGFLOW_DAEMON_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT)})
    with Load(d.base_url, prefix="t", threads=3, pause=0.02) as load:
        wait_for("sends in flight", lambda: sink.count() >= 10, 20.0)
        acked_before = load.acked()
        wait_for("more load", lambda: load.acked() > acked_before + 20, 20.0)
        started = time.monotonic()
        status, out, err = d.stop(signal.SIGTERM)
        took = time.monotonic() - started
        time.sleep(0.5)  # the load meets the closed port too
    assert status == 0, err[-3000:]
    assert took < DRAIN_TIMEOUT + EXIT_SLACK, f"exit took {took:.1f} s"
    assert log_events(out, "daemon.stopping"), out[-3000:]
    assert not log_events(out, "daemon.drain_cut_short"), "the drain hit drain_timeout"
    assert log_events(out, "daemon.stopped")

    snap = snapshot(sqlite_url)
    assert missing_acknowledged(load, snap) == []
    assert load.contract_breaches() == []
    assert load.statuses()["no answer"] > 0  # the port did close
    # A clean stop finishes its sends: nothing is left in flight to become `unknown`.
    statuses = snap.message_statuses()
    assert statuses["sent"] > 0
    assert set(statuses) <= {"sent", "queued"}, statuses
    check_sink_against_store(sink, snap)


def test_a_second_sigterm_cuts_the_drain_short(
        start_daemon, sqlite_url: str, sink: Sink, tmp_path: Path) -> None:
    """A send hangs in DATA, so the drain waits for it (up to 60 s); a second SIGTERM
    ends the wait at once, and the exit is still 0."""
    d = start_daemon(store_url=sqlite_url, app=campaign_app(tmp_path / "templates"),
                     extra=smtp_config(sink.port),
                     env={**smtp_env(), "SEGFLOW_DAEMON_DRAIN_TIMEOUT": "60"})
    sink.hold()
    try:
        with Load(d.base_url, prefix="h", threads=1, pause=0.05):
            sink.wait_held()
        d.process.send_signal(signal.SIGTERM)
        time.sleep(2.0)
        assert d.process.poll() is None  # draining: the send in flight holds it
        started = time.monotonic()
        status, out, err = d.stop(signal.SIGTERM)
        took = time.monotonic() - started
    finally:
        sink.release()
    assert status == 0, err[-3000:]
    # Not the 60 s drain: at most the send in flight, which ends at the smtp timeout (5 s).
    assert took < SMTP_TIMEOUT + EXIT_SLACK, f"exit took {took:.1f} s after the second signal"
    assert log_events(out, "daemon.signal_again")
    assert log_events(out, "daemon.drain_cut_short")
    assert log_events(out, "daemon.stopped")
