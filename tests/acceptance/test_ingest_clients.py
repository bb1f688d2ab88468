"""A running segflowd (a subprocess) driven by the official Segment and Customer.io Python
libraries, unchanged but for the host, and by segflowd's own client — on SQLite and MariaDB."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from customerio.track import CustomerIO  # not `customerio`: see test_clients_python.py
from daemon_harness import store_rows
from segment.analytics.client import Client as SegmentClient
from segment.analytics.request import APIError

from segflowd.client import BatchItem, SegflowAPIError, SyncSegflowClient

pytestmark = pytest.mark.slow

SECRET = "acceptance-secret"
SITE = "site-a"
START_TIMEOUT = 30.0  # seconds for the daemon to answer /healthz
STOP_TIMEOUT = 20.0  # seconds for the daemon to exit after SIGTERM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def daemon(store_url: str, tmp_path: Path) -> Iterator[str]:
    """segflowd running on ``store_url``; yields its base URL; stopped with SIGTERM."""
    port = _free_port()
    (tmp_path / "app.py").write_text("from segflowd import Segflow\n\napp = Segflow()\n")
    config = tmp_path / "segflow.toml"
    config.write_text(f"""
[daemon]
app = "app.py:app"
control_socket = "run/segflow.sock"
log_format = "json"
[store]
url = "{store_url}"
[http]
listen = "127.0.0.1:{port}"
[[http.keys]]
name = "{SITE}"
secret = "{SECRET}"
[email]
provider = "outbox"
[providers.outbox]
plugin = "outbox"
path = "outbox"
""")
    log = (tmp_path / "daemon.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGFLOW_")}
    proc = subprocess.Popen([sys.executable, "-m", "segflowd.cli", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail("segflowd exited at start:\n"
                            + (tmp_path / "daemon.log").read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("segflowd did not become healthy:\n"
                            + (tmp_path / "daemon.log").read_text()[-3000:])
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(STOP_TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def _count(store_url: str, sql: str, **params: object) -> int:
    (row,) = store_rows(store_url, sa.text(sql).bindparams(**params))
    return int(next(iter(row.values())))


def test_official_segment_library_sends_gzip_batches_that_are_stored(
        daemon: str, store_url: str) -> None:
    errors: list[object] = []
    client = SegmentClient(write_key=SECRET, host=daemon, gzip=True,
                           on_error=lambda e, batch: errors.append(e), upload_interval=0.05)
    client.track(anonymous_id="anon-1", event="Visited", properties={"path": "/"})
    client.identify(user_id="u1", anonymous_id="anon-1",
                    traits={"email": "ann@example.com", "plan": "pro"})
    client.track(user_id="u1", event="Order Completed", properties={"total": 42.5},
                 message_id="order-1")
    client.track(user_id="u1", event="Order Completed", properties={"total": 42.5},
                 message_id="order-1")  # a retry: stored once
    client.page(user_id="u1", name="Pricing", properties={"url": "/pricing"})
    client.screen(user_id="u1", name="Home")
    client.group(user_id="u1", group_id="acme", traits={"name": "Acme"})
    client.alias(previous_id="anon-2", user_id="u1")
    client.flush()
    client.shutdown()
    assert errors == []
    with SyncSegflowClient(daemon, SECRET) as sf:
        user = sf.get_user("u1")
    assert user["email"] == "ann@example.com"
    assert user["attributes"]["plan"] == "pro"
    assert _count(store_url, "SELECT COUNT(*) FROM events WHERE user_id = 'u1'") == 5
    assert _count(store_url, "SELECT COUNT(*) FROM events WHERE name = 'Order Completed'") == 1


def test_segment_library_is_refused_with_a_wrong_write_key(daemon: str, store_url: str) -> None:
    errors: list[object] = []
    client = SegmentClient(write_key="wrong", host=daemon, sync_mode=True, max_retries=0,
                           on_error=lambda e, batch: errors.append(e))
    with pytest.raises(APIError) as refused:
        client.track(user_id="u1", event="x")
    assert refused.value.status == 401
    assert _count(store_url, "SELECT COUNT(*) FROM events") == 0


def test_official_customerio_library_identify_track_anonymous_and_delete(
        daemon: str, store_url: str) -> None:
    cio = CustomerIO(site_id=SITE, api_key=SECRET, retries=1)
    cio.base_url = f"{daemon}/api/v1"  # the host: the library otherwise speaks https only
    cio.identify(id="c1", email="c@example.com", plan="basic", nickname=None)
    cio.track(customer_id="c1", name="purchase", data={"amount": 10}, id="p1")
    cio.track(customer_id="c1", name="purchase", data={"amount": 10}, id="p1")
    cio.pageview(customer_id="c1", page="https://example.com/pricing")
    cio.track_anonymous(anonymous_id="anon-c", name="invited", data={"by": "c1"})
    assert _count(store_url, "SELECT COUNT(*) FROM events WHERE user_id = 'c1'") == 2
    assert _count(store_url, "SELECT COUNT(*) FROM events WHERE anonymous_id = 'anon-c'") == 1
    assert _count(store_url, "SELECT COUNT(*) FROM users WHERE email = 'c@example.com'") == 1
    cio.delete(customer_id="c1")
    assert _count(store_url, "SELECT COUNT(*) FROM users") == 0
    assert _count(store_url, "SELECT COUNT(*) FROM events WHERE user_id = 'c1'") == 0
    bad = CustomerIO(site_id=SITE, api_key="wrong", retries=0)
    bad.base_url = f"{daemon}/api/v1"
    with pytest.raises(Exception, match="401"):
        bad.identify(id="c2", email="x@example.com")


def test_segflow_client_creates_emits_batches_and_deletes(daemon: str, store_url: str) -> None:
    with SyncSegflowClient(daemon, SECRET) as sf:
        sf.create_user("n1", {"email": "n@example.com", "plan": "free"})
        sf.update_user("n1", {"plan": None})
        first = sf.emit("n1", "login", {"ip": "1"}, id="l1")
        assert sf.emit("n1", "login", {"ip": "1"}, id="l1") == first
        sf.batch([BatchItem("n2", attributes={"name": "Bo"}),
                  BatchItem("n2", name="signup", id="s1")])
        assert sf.get_user("n1")["attributes"] == {"email": "n@example.com"}
        assert sf.get_user("n2")["attributes"] == {"name": "Bo"}
        assert sf.delete_user("n1") is True
        with pytest.raises(SegflowAPIError) as info:
            sf.get_user("n1")
        assert info.value.status == 404
    with SyncSegflowClient(daemon, "wrong") as bad, pytest.raises(SegflowAPIError) as denied:
        bad.emit("n2", "x")
    assert denied.value.status == 401
    assert _count(store_url, "SELECT COUNT(*) FROM events") == 1
