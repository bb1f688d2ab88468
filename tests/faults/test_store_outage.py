"""MariaDB stopped for 20 s under load, then started: segflowd stays up, answers 503 with
Retry-After meanwhile, and works again within 5 s of the store's return, losing nothing.

The server is a private mariadbd (``private_mariadb``), never the shared one on :3306.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import httpx
import pytest
from daemon_harness import API_SECRET
from fault_harness import (
    SETTLE_TIMEOUT,
    WAIT_SECONDS,
    Load,
    Sink,
    campaign_app,
    check_sink_against_store,
    missing_acknowledged,
    settled,
    smtp_config,
    smtp_env,
    snapshot,
    utcnow,
    wait_for,
)

from segflowd.testing import PrivateMariaDB

pytestmark = pytest.mark.slow

OUTAGE = 20.0  # seconds the store is down
RECOVERY = 5.0  # seconds after the store answers again within which ingest must work


def _probe_until_ingest_works(base_url: str, limit: float) -> float:
    """POST events until one is acknowledged; return how long that took (seconds)."""
    started = time.monotonic()
    with httpx.Client(timeout=limit,
                      headers={"Authorization": f"Bearer {API_SECRET}"}) as client:
        n = 0
        while time.monotonic() - started < limit:
            n += 1
            try:
                r = client.post(f"{base_url}/v1/users/probe/events",
                                json={"name": "probe", "id": f"probe-{n}"})
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 202:
                return time.monotonic() - started
            time.sleep(0.05)
    return time.monotonic() - started


def test_store_down_for_20s_503_meanwhile_and_no_loss(
        start_daemon, private_mariadb: PrivateMariaDB, sink: Sink, tmp_path: Path) -> None:
    """The daemon survives a 20 s MariaDB outage under load: ingest answers 503 with
    Retry-After (never 500, never a dropped connection), /healthz says 503, ingest works
    within 5 s of the return, and every 2xx write, flow and message survives."""
    url = private_mariadb.url
    d = start_daemon(store_url=url, app=campaign_app(tmp_path / "templates"),
                     extra=smtp_config(sink.port), env=smtp_env())
    with Load(d.base_url, prefix="m", threads=3, pause=0.1, max_requests=4000) as load:
        wait_for("the campaign's first sends", lambda: sink.count() >= 5, 20.0)
        private_mariadb.stop()
        stopped, stopped_at = time.monotonic(), utcnow()
        health = None
        while time.monotonic() - stopped < OUTAGE:
            assert d.process.poll() is None, "segflowd died while the store was down"
            if health is None and time.monotonic() - stopped > OUTAGE / 2:
                health = httpx.get(f"{d.base_url}/healthz", timeout=10)
            time.sleep(0.25)
        restarting = time.monotonic()
        private_mariadb.start()  # returns once the server answers SELECT 1
        returned_at = utcnow()
        recovered_in = _probe_until_ingest_works(d.base_url, RECOVERY + 10)
        healthy = httpx.get(f"{d.base_url}/healthz", timeout=10)
        time.sleep(3.0)  # load after the return as well
    wait_for("every flow to end and the outbox to empty", lambda: settled(url),
             SETTLE_TIMEOUT, 0.25)
    status, _, err = d.stop()
    assert status == 0, err[-3000:]

    assert health is not None
    assert health.status_code == 503
    assert health.json()["store"] == "unreachable"
    assert recovered_in <= RECOVERY, f"ingest worked again {recovered_in:.1f} s after"
    assert healthy.status_code == 200

    # Meanwhile: 503 with Retry-After, and only that.
    outage = [a for a in load.answers if a.sent > stopped + 1.0 and a.done < restarting]
    assert len(outage) >= 20, "the load barely ran during the outage"
    assert {a.status for a in outage} == {503}
    assert load.contract_breaches() == []
    assert load.statuses()["no answer"] == 0

    snap = snapshot(url)
    assert missing_acknowledged(load, snap) == []
    # Flows and delivery caught up within the same bound: waits that fell due during the
    # outage, and every message, went out within 5 s of the store's return.
    woke = [j for j in snap.journal if j["kind"] == "wait"
            and stopped_at < j["created_at"] + dt.timedelta(seconds=WAIT_SECONDS) < returned_at]
    assert woke, "no wait fell due during the outage"
    bound = dt.timedelta(seconds=RECOVERY)
    resumed = {(j["instance_id"], j["seq"]): j["created_at"] for j in snap.journal}
    for j in woke:
        assert resumed[(j["instance_id"], j["seq"] + 1)] <= returned_at + bound, j
    for m in snap.messages:
        assert m["sent_at"] <= max(m["created_at"], returned_at) + bound, m
    assert {i["status"] for i in snap.instances} == {"completed"}
    assert load.acked_users <= {i["user_id"] for i in snap.instances}  # every entry made
    assert snap.message_statuses().keys() == {"sent"}, snap.message_statuses()
    check_sink_against_store(sink, snap)
