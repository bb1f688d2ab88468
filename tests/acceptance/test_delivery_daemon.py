"""The running daemon (a subprocess) delivers a queued message through the file outbox
and serves the unsubscribe link that message carries."""

from __future__ import annotations

import contextlib
import datetime as dt
import email
import email.policy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
import sqlalchemy as sa

from segflowd.delivery.outbox import enqueue
from segflowd.schema import messages, subscriptions, users
from segflowd.store import Store

pytestmark = pytest.mark.slow

START_TIMEOUT = 30.0  # seconds for the daemon to answer /healthz
SEND_TIMEOUT = 30.0  # seconds for the message to appear in the outbox folder
STOP_TIMEOUT = 20.0  # seconds for the daemon to exit after SIGTERM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _seed(url: str) -> None:
    store = Store.open(url)
    await store.migrate()
    t = dt.datetime(2026, 1, 1)
    async with store.begin() as conn:
        await conn.execute(sa.insert(users).values(
            id="u1", email="ann@example.org", attributes={"name": "Ann"}, created_at=t,
            updated_at=t))
        await enqueue(conn, kind="campaign", template="hello", now=t, user_id="u1",
                      dedupe_key="acceptance-1", campaign="c")
    await store.close()


async def _read(url: str) -> tuple[str, bool]:
    store = Store.open(url)
    async with store.connect() as conn:
        status = (await conn.execute(sa.select(messages.c.status))).scalar_one()
        unsub = (await conn.execute(sa.select(subscriptions.c.unsubscribed_at).where(
            subscriptions.c.user_id == "u1"))).scalar_one_or_none()
    await store.close()
    return str(status), unsub is not None


@pytest.mark.parametrize("render_processes", [0, 1])  # in the daemon; a render pool
def test_daemon_sends_from_the_outbox_and_serves_unsubscribe(
        sqlite_url: str, tmp_path: Path, render_processes: int) -> None:
    port = _free_port()
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "hello.html").write_text(
        '{% extends "segflow/layout.html" %}{% block content %}Hi {{ user.name }}'
        "{% endblock %}")
    (tmp_path / "app.py").write_text(
        "from segflowd import Segflow\n\napp = Segflow(templates='templates')\n"
        "app.template('hello', subject='Hello {{ user.name }}', html='hello.html')\n")
    config = tmp_path / "segflow.toml"
    config.write_text(f"""
[daemon]
app = "app.py:app"
control_socket = "run/segflow.sock"
log_format = "json"
[store]
url = "{sqlite_url}"
[http]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
[email]
from = "Example <hello@example.com>"
provider = "files"
secret = "acceptance-link-key"
poll_interval = 0.2
[providers.files]
plugin = "outbox"
path = "outbox"
concurrency = 1
render_processes = {render_processes}
""")
    anyio.run(_seed, sqlite_url)
    log = (tmp_path / "daemon.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGFLOW_")}
    proc = subprocess.Popen([sys.executable, "-m", "segflowd.cli", "run", "--config",
                             str(config)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SEND_TIMEOUT
        files: list[Path] = []
        while not files:
            if proc.poll() is not None:
                pytest.fail("segflowd exited:\n" + (tmp_path / "daemon.log").read_text()[-3000:])
            if time.monotonic() > deadline:
                pytest.fail("no message was delivered:\n"
                            + (tmp_path / "daemon.log").read_text()[-3000:])
            files = sorted((tmp_path / "outbox").glob("*.eml")) \
                if (tmp_path / "outbox").exists() else []
            time.sleep(0.1)
        msg = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
        assert msg["Subject"] == "Hello Ann"
        link = msg["List-Unsubscribe"].split(">")[0].lstrip("<")
        assert link.startswith(f"{base}/u/")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("segflowd did not become healthy")
            time.sleep(0.1)
        r = httpx.post(base + urlsplit(link).path, content=b"List-Unsubscribe=One-Click",
                       headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(STOP_TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert anyio.run(_read, sqlite_url) == ("sent", True)
