"""The postmark provider against a local HTTP server on loopback.

The server stands in for the real Postmark service: it implements the documented
``POST /email/batch`` request (``X-Postmark-Server-Token``, a JSON array of messages)
and its documented answers: a per-message array with ``ErrorCode`` 0 or an error such
as 406 (inactive recipient) or 300 (invalid email request), 401 for a bad token, and
429 when rate limited.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa
from delivery_harness import add_user, make_kernel, message_row

from segflow_plugins.postmark import PostmarkProvider
from segflowd.delivery.mime import MessageParts, build_message
from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.errors import ProviderError
from segflowd.providers import OutgoingMessage, ProviderContext
from segflowd.schema import suppressions
from segflowd.store import Store

pytestmark = pytest.mark.anyio

TOKEN = "server-token"


class FakePostmark(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[list[dict[str, object]]] = []
        self.mode = "normal"  # or "429", "500"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakePostmark

    def log_message(self, format: str, *args: object) -> None:  # stdlib's name
        return None

    def _answer(self, status: int, body: object) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:  # the stdlib's handler name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/email/batch":
            return self._answer(404, {"ErrorCode": 404, "Message": "not found"})
        if self.headers.get("X-Postmark-Server-Token") != TOKEN:
            return self._answer(401, {"ErrorCode": 10, "Message": "Bad or missing API token"})
        if self.server.mode == "429":
            return self._answer(429, {"ErrorCode": 429, "Message": "Rate limit exceeded"})
        if self.server.mode == "500":
            return self._answer(500, {"ErrorCode": 500, "Message": "Internal error"})
        if not isinstance(body, list) or len(body) > 500:
            return self._answer(422, {"ErrorCode": 300, "Message": "Invalid batch"})
        self.server.requests.append(body)
        out = []
        now = dt.datetime.now(dt.UTC).isoformat()
        for m in body:
            to = str(m["To"])
            if "inactive" in to:
                out.append({"ErrorCode": 406, "To": to, "Message":
                            "You tried to send to recipient(s) that have been marked as "
                            "inactive."})
            elif "invalid" in to:
                out.append({"ErrorCode": 300, "Message": "Invalid 'To' address"})
            else:
                out.append({"ErrorCode": 0, "Message": "OK", "To": to,
                            "MessageID": str(uuid.uuid4()), "SubmittedAt": now})
        return self._answer(200, out)


@pytest.fixture
def postmark() -> Iterator[FakePostmark]:
    server = FakePostmark()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def message(i: int, to: str, kind: str = "campaign") -> OutgoingMessage:
    return build_message(MessageParts(
        row_id=i, kind=kind, sender="Example <hello@example.com>", to=to,
        subject=f"Subject {i}", html=f"<p>{i}</p>", text=str(i),
        message_id=f"{i}.x@example.com", date=dt.datetime(2026, 1, 1),
        reply_to="support@example.com", unsubscribe_url="https://m.example.com/u/T"))


def provider(url: str, tmp_path: Path, **opts: object) -> PostmarkProvider:
    return PostmarkProvider(ProviderContext("pm", {"server_token": TOKEN, "base_url": url,
                                                   **opts}, tmp_path))


async def test_batch_partial_failure_maps_each_message(postmark: FakePostmark,
                                                       tmp_path: Path) -> None:
    p = provider(postmark.url, tmp_path, message_stream="broadcast")
    try:
        ok, inactive, invalid = await p.send([
            message(1, "ann@example.org"), message(2, "inactive@example.org"),
            message(3, "invalid@example.org")])
    finally:
        await p.aclose()
    assert ok.ok
    assert ok.provider_message_id
    assert (inactive.ok, inactive.suppress, inactive.transient) == (False, True, False)
    assert "406" in (inactive.error or "")
    assert (invalid.ok, invalid.suppress, invalid.transient) == (False, False, False)
    [batch] = postmark.requests
    first = batch[0]
    assert first["MessageStream"] == "broadcast"
    assert first["From"] == "Example <hello@example.com>"
    assert first["ReplyTo"] == "support@example.com"
    assert first["HtmlBody"] == "<p>1</p>"
    assert first["TextBody"] == "1"
    assert {"Name": "List-Unsubscribe-Post", "Value": "List-Unsubscribe=One-Click"} in \
        first["Headers"]  # type: ignore[operator]


@pytest.mark.parametrize("mode", ["429", "500"])
async def test_rate_limit_and_server_errors_are_transient(
        postmark: FakePostmark, tmp_path: Path, mode: str) -> None:
    postmark.mode = mode
    p = provider(postmark.url, tmp_path)
    try:
        results = await p.send([message(1, "a@example.org"), message(2, "b@example.org")])
    finally:
        await p.aclose()
    assert [(r.ok, r.transient) for r in results] == [(False, True), (False, True)]


async def test_bad_token_is_a_permanent_failure(postmark: FakePostmark, tmp_path: Path) -> None:
    p = PostmarkProvider(ProviderContext("pm", {"server_token": "wrong",
                                                "base_url": postmark.url}, tmp_path))
    try:
        [r] = await p.send([message(1, "a@example.org")])
    finally:
        await p.aclose()
    assert (r.ok, r.transient) == (False, False)
    assert "401" in (r.error or "")


def test_batch_size_is_capped_at_postmarks_limit(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match=r"max_batch: must be 1\.\.500"):
        PostmarkProvider(ProviderContext("pm", {"server_token": "t", "max_batch": 501},
                                         tmp_path))
    with pytest.raises(ProviderError, match="unknown option"):
        PostmarkProvider(ProviderContext("pm", {"server_token": "t", "stream": "x"}, tmp_path))


async def test_delivery_through_postmark_suppresses_inactive_and_retries_429(
        store: Store, tmp_path: Path, postmark: FakePostmark) -> None:
    setup = make_kernel(store, tmp_path, provider="pm", options=(
        f'plugin = "postmark"\nserver_token = "{TOKEN}"\nbase_url = "{postmark.url}"\n'))
    await add_user(store, "u1", "ann@example.org", name="Ann")
    await add_user(store, "u2", "inactive@example.org", name="Ina")
    ids = []
    async with store.begin() as conn:
        for user in ("u1", "u2"):
            ids.append(await enqueue(conn, kind="campaign", template="welcome",
                                     now=setup.clock.now(), user_id=user,
                                     dedupe_key=f"k-{user}", data={"plan": "pro"}))
    svc = DeliveryService(setup.kernel)
    try:
        postmark.mode = "429"
        await svc.run_once()
        assert [(await message_row(store, i))["status"] for i in ids] == ["queued", "queued"]
        postmark.mode = "normal"
        setup.clock.set(setup.clock.now() + dt.timedelta(hours=1))
        assert await svc.run_once() == 2
    finally:
        await svc.provider.aclose()
    rows = [await message_row(store, i) for i in ids]
    assert [r["status"] for r in rows] == ["sent", "failed"]
    assert [r["attempts"] for r in rows] == [2, 2]
    async with store.connect() as conn:
        sup = (await conn.execute(sa.select(suppressions.c.address))).scalars().all()
    assert sup == ["inactive@example.org"]
