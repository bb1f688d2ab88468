"""MariaDB frozen (SIGSTOP: its connections stay open, nothing answers) for 30 s under
load: no request hangs for the outage. Ingest answers 503 with Retry-After within the
store's bound, /healthz says 503, the daemon logs ``store.unavailable`` with the cause,
and once the server thaws ingest works again by itself, with every 2xx write stored.

The server is a private mariadbd (``private_mariadb``), never the shared one on :3306;
it is thawed (SIGCONT) whatever happens, before the fixture stops it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from daemon_harness import API_SECRET
from fault_harness import Load, log_events, missing_acknowledged, snapshot

from segflowd.config import load_config
from segflowd.errors import ConfigError
from segflowd.testing import PrivateMariaDB

pytestmark = pytest.mark.slow

FREEZE = 30.0  # seconds the server is stopped
STORE_TIMEOUT = 2.0  # [store] timeout of the daemon under test (seconds)
SETTLE = 1.0  # seconds into the freeze before answers must be 503s
RECOVERY = 10.0  # seconds after the thaw within which ingest must work again
HEALTH_TIMEOUT = 10.0  # seconds the test waits for /healthz to answer at all


@pytest.fixture
def frozen(private_mariadb: PrivateMariaDB) -> Iterator[PrivateMariaDB]:
    """The private server; whatever the test does, it is thawed at the end."""
    try:
        yield private_mariadb
    finally:
        thaw(private_mariadb)


def freeze(server: PrivateMariaDB) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)


def thaw(server: PrivateMariaDB) -> None:
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)


def probe_until_ingest_works(base_url: str, limit: float) -> bool:
    """POST events until one is acknowledged (True) or ``limit`` seconds pass (False)."""
    deadline = time.monotonic() + limit
    with httpx.Client(timeout=limit, headers={"Authorization": f"Bearer {API_SECRET}"}) as c:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            try:
                r = c.post(f"{base_url}/v1/users/probe/events",
                           json={"name": "probe", "id": f"probe-{n}"})
                if r.status_code == 202:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    return False


def test_frozen_store_answers_503_logs_and_recovers(start_daemon, frozen: PrivateMariaDB
                                                    ) -> None:
    """Under load, a MariaDB stopped with SIGSTOP for 30 s: every request during the
    freeze is answered 503 with Retry-After (none waits for the thaw), /healthz is 503,
    ``store.unavailable`` names the cause, and ingest recovers after SIGCONT."""
    url = frozen.url
    d = start_daemon(store_url=url, env={"SEGFLOW_STORE_TIMEOUT": str(STORE_TIMEOUT)})
    try:
        with Load(d.base_url, prefix="f", threads=3, pause=0.1, max_requests=3000) as load:
            time.sleep(1.0)  # the load runs against a healthy store first
            assert load.acked() > 0, load.statuses()
            freeze(frozen)
            frozen_at = time.monotonic()
            time.sleep(FREEZE / 2)
            health = httpx.get(f"{d.base_url}/healthz", timeout=HEALTH_TIMEOUT)
            time.sleep(max(0.0, frozen_at + FREEZE - time.monotonic()))
            thawed_at = time.monotonic()
            thaw(frozen)
            recovered = probe_until_ingest_works(d.base_url, RECOVERY)
            healthy = httpx.get(f"{d.base_url}/healthz", timeout=HEALTH_TIMEOUT)
            time.sleep(1.0)  # load after the thaw as well
    finally:
        thaw(frozen)
    status, out, err = d.stop()
    assert status == 0, err[-3000:]

    # During the freeze: answered, and answered 503 with Retry-After; nothing hung on.
    during = [a for a in load.answers if frozen_at + SETTLE < a.sent and a.done < thawed_at]
    assert len(during) >= 20, f"only {len(during)} answers during the freeze"
    assert {a.status for a in during} == {503}, load.statuses()
    assert all(a.retry_after for a in during)
    assert load.contract_breaches() == []
    assert load.statuses()["no answer"] == 0
    assert health.status_code == 503
    assert health.json()["store"] == "unreachable"
    assert health.headers.get("retry-after")

    unavailable = log_events(out + err, "store.unavailable")
    assert unavailable, "no store.unavailable in the daemon's log"
    assert f"within {STORE_TIMEOUT:g} s" in str(unavailable[0]["cause"]), unavailable[0]
    assert log_events(out + err, "store.available")

    assert recovered, f"ingest did not work again within {RECOVERY} s of the thaw"
    assert healthy.status_code == 200
    # Every 2xx write is stored (a request answered 503 may be stored too: its client
    # retries it, and event ids make the retry a duplicate).
    assert missing_acknowledged(load, snapshot(url)) == []


def test_store_timeout_defaults_to_5s_and_must_be_positive(tmp_path: Path) -> None:
    """``[store] timeout`` is 5 s unless set; 0 is refused naming the file and key."""
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n', encoding="utf-8")
    assert load_config(path, {}).store.timeout == 5.0
    path.write_text('[daemon]\napp = "app.py:app"\n[store]\ntimeout = 0\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.key == "store.timeout"
    assert str(path) in str(caught.value)
