"""kill -9 of segflowd during sustained ingest with a campaign running, then a restart."""

from __future__ import annotations

import collections
import datetime as dt
import signal
import time
from pathlib import Path

import pytest
from fault_harness import (
    SETTLE_TIMEOUT,
    WAIT_SECONDS,
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
    utcnow,
    wait_for,
)

pytestmark = pytest.mark.slow

CONCURRENCY = 2  # delivery workers
MAX_BATCH = 1  # messages one worker claims at a time: the smtp plugin's default


def test_kill_9_loses_nothing_acknowledged_and_sends_nothing_twice(
        start_daemon, store_url: str, sink: Sink, tmp_path: Path) -> None:
    """After kill -9 and a restart: every 2xx write is stored, no message reaches the sink
    twice, the message cut mid-send is ``unknown`` (at most one per worker) and reported,
    and every instance that was waiting sends its second message, not before its wake."""
    app = campaign_app(tmp_path / "templates")
    extra = smtp_config(sink.port, concurrency=CONCURRENCY)  # max_batch: the default
    env = smtp_env()
    first = start_daemon(store_url=store_url, app=app, extra=extra, env=env)
    with Load(first.base_url, prefix="k", threads=3, pause=0.1) as load:
        # Long enough that instances are past their first send and into their wait.
        wait_for("the campaign's first sends", lambda: sink.count() >= 10, 20.0)
        time.sleep(1.0)
        sink.hold()  # the next message stays in DATA: a send is in flight at the kill
        held = sink.wait_held()
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        killed_at = utcnow()
        sink.release()
        acked_before = load.acked()
        time.sleep(1.0)  # the load keeps knocking on a dead port
        second = start_daemon(store_url=store_url, app=app, extra=extra, env=env)
        load.base_url = second.base_url
        wait_for("acknowledged writes after the restart",
                 lambda: load.acked() > acked_before + 10, 20.0)
    wait_for("every flow to end and the outbox to empty", lambda: settled(store_url),
             SETTLE_TIMEOUT, 0.25)
    status, out, err = second.stop()
    assert status == 0, err[-3000:]

    snap = snapshot(store_url)
    # Nothing acknowledged is lost.
    assert load.acked_events, "the load got no acknowledgement at all"
    assert missing_acknowledged(load, snap) == []
    statuses = load.statuses()
    assert statuses["no answer"] > 0, "the load never saw the daemon down"

    # No message twice; what is recorded as sent was received.
    check_sink_against_store(sink, snap)

    # The message cut mid-send is unknown, not re-sent, and reported by the new process.
    unknown = [m for m in snap.messages if m["status"] == "unknown"]
    unknown_ids = {bare_message_id(str(m["message_id"] or "")) for m in unknown}
    assert 1 <= len(unknown) <= CONCURRENCY * MAX_BATCH, unknown
    assert bare_message_id(held.message_id) in unknown_ids
    reported = {e["message"] for e in log_events(out, "message.unknown")}
    assert reported == {m["id"] for m in unknown}
    assert all(m["attempts"] == 1 for m in unknown)

    # Every instance ended, each with one message per send, the second not before its wake.
    assert {i["status"] for i in snap.instances} == {"completed"}
    assert load.acked_users <= {i["user_id"] for i in snap.instances}  # every entry made
    per_instance = collections.Counter((m["instance_id"], m["template"]) for m in snap.messages)
    assert set(per_instance.values()) == {1}
    assert len(per_instance) == 2 * len(snap.instances)
    steps: dict[int, dict[str, dt.datetime]] = collections.defaultdict(dict)
    for j in snap.journal:
        steps[int(j["instance_id"])][f"{j['kind']}:{j['name'] or ''}"] = j["created_at"]
    waiting_at_kill = 0
    for iid, s in steps.items():
        wake = s["wait:"] + dt.timedelta(seconds=WAIT_SECONDS)
        assert s["send_email:later"] >= wake, f"instance {iid} woke before {wake}"
        if s["wait:"] < killed_at < wake:
            waiting_at_kill += 1
            assert s["send_email:later"] > killed_at, f"instance {iid} sent before the kill"
    assert waiting_at_kill > 0, "no instance was waiting when the daemon was killed"
