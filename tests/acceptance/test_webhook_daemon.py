"""``rt.webhook`` through the running daemon (a process, SQLite) and a receiver on loopback:
a daemon killed with SIGKILL while the receiver holds the call makes it again after the
restart with the same ``Idempotency-Key``, and the flow completes once."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from daemon_harness import API_SECRET, RunningDaemon, launch, stop, store_rows

from segflowd.schema import flow_instances, flow_journal, messages

pytestmark = pytest.mark.slow

SETTLE_TIMEOUT = 30.0  # seconds for the daemon to settle the call and the flow
HOLD = 60.0  # seconds the receiver keeps the first request unanswered (ends at teardown)

APP = """\
from segflowd import Segflow

app = Segflow()
app.segment("signed-up", sql="SELECT user_id AS id FROM events WHERE name = 'signup'")


@app.campaign("notify", segments=["signed-up"])
def notify(ctx, rt):
    r = yield rt.webhook(URL, json={"user": ctx.user_id})
    assert r.status == 200 and r.json == {"ok": True}
"""


@dataclasses.dataclass(frozen=True)
class Seen:
    path: str
    key: str
    body: bytes


class Receiver:
    """Records each POST; holds the first one until ``release`` (or HOLD), answers the
    rest at once with ``{"ok": true}``."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.seen.append(Seen(self.path, self.headers.get(
                        "Idempotency-Key", ""), body))
                    first = len(receiver.seen) == 1
                if first:
                    receiver.release.wait(HOLD)
                reply = b'{"ok": true}'
                with contextlib.suppress(OSError):  # the caller may be dead by now
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def calls(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    thread = threading.Thread(target=r.server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield r
    finally:
        r.release.set()
        r.server.shutdown()
        r.server.server_close()


def wait_for(check: Callable[[], bool], what: str, d: RunningDaemon) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not check():
        if d.process.poll() is not None or time.monotonic() > deadline:
            log = (d.config_path.parent / "stderr.log").read_text(errors="replace")
            out = (d.config_path.parent / "stdout.log").read_text(errors="replace")
            pytest.fail(f"{what}\n{out[-3000:]}\n{log[-3000:]}")
        time.sleep(0.05)


def test_sigkill_during_a_call_repeats_it_with_the_same_key_and_the_flow_completes_once(
        receiver: Receiver, tmp_path: Path) -> None:
    store_url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    app = APP.replace("URL", json.dumps(receiver.url))
    extra = f'[webhooks]\nallow = ["{receiver.url}*"]\nretry_base = 0.1\nretry_max = 1.0\n'
    started: list[RunningDaemon] = []
    try:
        d = launch(tmp_path / "first", store_url=store_url, app=app, extra=extra,
                   started=started)
        with httpx.Client(base_url=d.base_url, timeout=10,
                          headers={"Authorization": f"Bearer {API_SECRET}"}) as client:
            client.put("/v1/users/ann", json={"attributes": {}}).raise_for_status()
            client.post("/v1/users/ann/events", json={"name": "signup"}).raise_for_status()
        wait_for(lambda: len(receiver.calls()) == 1, "the call never reached the receiver", d)
        [hook] = store_rows(store_url, sa.select(messages).where(
            messages.c.channel == "webhook"))
        assert hook["status"] == "sending"
        status, _, _ = stop(d.process, signal.SIGKILL)
        assert status == -signal.SIGKILL

        again = launch(tmp_path / "second", store_url=store_url, app=app, extra=extra,
                       started=started)

        def completed() -> bool:
            rows = store_rows(store_url, sa.select(flow_instances.c.status))
            return [r["status"] for r in rows] == ["completed"]

        wait_for(completed, "the flow did not complete after the restart", again)
        [inst] = store_rows(store_url, sa.select(flow_instances))
        key = f"flow:{inst['id']}:0"
        calls = receiver.calls()
        assert [c.key for c in calls] == [key, key]  # the repeat carries the same key
        assert {json.loads(c.body)["user"] for c in calls} == {"ann"}
        [hook] = store_rows(store_url, sa.select(messages).where(
            messages.c.channel == "webhook"))
        assert (hook["status"], hook["dedupe_key"], hook["attempts"]) == ("sent", key, 2)
        journal = store_rows(store_url, sa.select(flow_journal).where(
            flow_journal.c.instance_id == inst["id"]))
        assert [(j["kind"], j["result"]["value"]["status"]) for j in journal] == [
            ("webhook", 200)]
    finally:
        receiver.release.set()
        for running_daemon in started:
            if running_daemon.process.poll() is None:
                stop(running_daemon.process)
