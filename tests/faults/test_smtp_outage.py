"""The SMTP server down for 20 s under load: a provider outage. Messages stay queued
without spending attempts while delivery probes the server, and each is delivered
exactly once when it returns."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fault_harness import (
    SETTLE_TIMEOUT,
    Load,
    Sink,
    bare_message_id,
    campaign_app,
    check_sink_against_store,
    log_events,
    missing_acknowledged,
    settled,
    smtp_config,
    smtp_env,
    snapshot,
    wait_for,
)

pytestmark = pytest.mark.slow

OUTAGE = 20.0  # seconds the SMTP server is down
MAX_ATTEMPTS = 2  # an outage must not spend them: two would not last 20 s of retries


def test_smtp_down_for_20s_every_message_held_and_delivered_once(
        start_daemon, sqlite_url: str, sink: Sink, tmp_path: Path) -> None:
    """A refused connection is the server's fault, not the messages': they are held
    queued (no attempt spent, however few ``max_attempts`` allows) while delivery probes
    the server; once it is back every message arrives once."""
    d = start_daemon(store_url=sqlite_url, app=campaign_app(tmp_path / "templates"),
                     extra=smtp_config(sink.port),
                     env=smtp_env(retry_base=0.5, retry_max=2.0, max_attempts=MAX_ATTEMPTS))
    with Load(d.base_url, prefix="s", threads=2, pause=0.3) as load:
        wait_for("the first deliveries", lambda: sink.count() >= 5, 20.0)
        sink.down()
        received_before = sink.count()
        deadline = time.monotonic() + OUTAGE
        while time.monotonic() < deadline:
            assert d.process.poll() is None, "segflowd died while the SMTP server was down"
            time.sleep(0.5)
        during = snapshot(sqlite_url)
        assert sink.count() == received_before
        sink.up()
        time.sleep(2.0)  # a little load after the return too
    wait_for("every flow to end and the outbox to empty", lambda: settled(sqlite_url),
             SETTLE_TIMEOUT, 0.25)
    assert httpx.get(f"{d.base_url}/healthz", timeout=5).status_code == 200
    status, out, err = d.stop()
    assert status == 0, err[-3000:]

    # While it was down, messages were held: queued, their error kept, no attempt spent.
    held = [m for m in during.messages if m["status"] == "queued" and m["last_error"]]
    assert held, "no message was held during the outage"
    assert all("smtp" in str(m["last_error"]) for m in held)
    assert all(int(m["attempts"]) == 0 for m in held), [
        (m["attempts"], m["last_error"]) for m in held]
    [outage] = log_events(out, "provider.outage")
    assert outage["provider"] == "sink"
    assert log_events(out, "provider.recovered")

    snap = snapshot(sqlite_url)
    assert snap.message_statuses().keys() == {"sent"}, snap.message_statuses()
    check_sink_against_store(sink, snap)
    delivered = sorted(bare_message_id(m) for m in sink.message_ids())
    assert delivered == sorted(str(m["message_id"]) for m in snap.messages)
    assert {i["status"] for i in snap.instances} == {"completed"}

    assert load.contract_breaches() == []
    assert load.statuses()["no answer"] == 0
    assert missing_acknowledged(load, snap) == []
