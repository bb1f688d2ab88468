"""``rt.webhook`` under ``segflowd.testing.Simulation``: the real call to a receiver on
loopback, its retry after a 500 waiting in virtual time, the flow resumed with the answer."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from segflowd.testing import Simulation

START = dt.datetime(2026, 3, 1, 9, 0)

APP = """\
from segflowd import Segflow, WebhookFailed

app = Segflow(templates="templates")
app.segment("everyone", sql="SELECT id FROM users")

@app.campaign("hello", segments=["everyone"])
def hello(ctx, rt):
    r = yield rt.webhook(URL, json={"user": ctx.user_id})
    yield rt.send_email("done", status=r.status, n=r.json["n"])

app.template("done", subject="{{ status }} {{ n }}", html="done.html")
"""


class Receiver:
    """Answers 500 first, then 200 ``{"n": 7}``; records the Idempotency-Key of each."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.keys.append(self.headers.get("Idempotency-Key", ""))
                ok = len(receiver.keys) > 1
                body = b'{"n": 7}' if ok else b"boom"
                self.send_response(200 if ok else 500)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    thread = threading.Thread(target=r.server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


def test_a_webhook_step_retries_in_virtual_time_and_the_flow_sees_the_answer(
        receiver: Receiver, tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "done.html").write_text("<p>done</p>")
    (tmp_path / "app.py").write_text(APP.replace("URL", json.dumps(receiver.url)))
    config = {"webhooks": {"allow": [f"{receiver.url}*"], "retry_base": 60.0,
                           "retry_max": 120.0}}
    with Simulation(f"{tmp_path / 'app.py'}:app", start=START, config=config) as sim:
        sim.user("ann", email="ann@example.com")
        assert sim.sent("ann") == []  # the first call got a 500: the retry is due later
        assert len(receiver.keys) == 1
        sim.advance(minutes=5)
        sent = sim.sent("ann")
        kinds = [e.kind for e in sim.timeline("ann")]
    assert [m.template for m in sent] == ["done"]
    assert sent[0].subject == "200 7"
    assert sent[0].at > START  # after the backoff, in virtual time
    assert len(receiver.keys) == 2
    assert len(set(receiver.keys)) == 1
    assert receiver.keys[0].startswith("flow:")
    assert "webhook.retry" in kinds
    assert "webhook.answered" in kinds
    assert kinds.index("webhook.retry") < kinds.index("webhook.answered")
