"""The postmark provider against a local HTTP server on loopback.

The server stands in for the real Postmark service: it implements the documented
``POST /email/batch`` request (``X-Postmark-Server-Token``, a JSON array of messages)
and its documented answers: a per-message array with ``ErrorCode`` 0 or an error such
as 406 (inactive recipient) or 300 (invalid email request), 401 for a bad token, and
429 when rate limited. It can also misbehave as a network can: answer 200 with a body that
does not match the batch, stall after reading the request, or pass on a gateway's 504.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
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
        # or "429", "500", "504"; "garbled", "not-a-list", "short", "bad-element" (a 200
        # whose body does not answer the batch); "stall" (reads the request, never answers)
        self.mode = "normal"
        self.released = threading.Event()

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
        if self.server.mode == "stall":
            self.server.released.wait(30)
            return None
        if self.server.mode == "504":
            return self._answer(504, {"message": "upstream request timeout"})
        if self.server.mode == "garbled":
            raw = b"<html>502 proxy</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return None
        if self.server.mode == "not-a-list":
            return self._answer(200, {"ErrorCode": 0, "Message": "OK"})
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
        if self.server.mode == "short":
            out = out[:1]
        if self.server.mode == "bad-element":
            out[1:] = [{"Message": "OK"}, "?", {"ErrorCode": "zero"}][:len(out) - 1]
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
        server.released.set()
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


# -- what a failure means: certainly not sent (retry) or maybe sent (unknown) -------------------

@pytest.mark.parametrize("mode", ["garbled", "not-a-list", "short"])
async def test_a_200_whose_body_does_not_answer_the_batch_is_maybe_sent(
        postmark: FakePostmark, tmp_path: Path, mode: str) -> None:
    """Postmark took the request: every message may have gone out."""
    postmark.mode = mode
    p = provider(postmark.url, tmp_path)
    try:
        results = await p.send([message(1, "a@example.org"), message(2, "b@example.org")])
    finally:
        await p.aclose()
    assert [(r.ok, r.maybe_sent) for r in results] == [(False, True), (False, True)]
    assert all("postmark" in (r.error or "") for r in results)


async def test_a_malformed_answer_for_one_message_is_maybe_sent_for_that_one(
        postmark: FakePostmark, tmp_path: Path) -> None:
    postmark.mode = "bad-element"
    p = provider(postmark.url, tmp_path)
    try:
        results = await p.send([message(i, f"u{i}@example.org") for i in range(1, 5)])
    finally:
        await p.aclose()
    assert results[0].ok
    assert [(r.ok, r.maybe_sent, r.transient) for r in results[1:]] == [
        (False, True, False)] * 3


@pytest.mark.parametrize("mode", ["stall", "504"])
async def test_no_answer_after_the_request_went_out_is_maybe_sent(
        postmark: FakePostmark, tmp_path: Path, mode: str) -> None:
    """A read timeout, or a gateway's 504 (the upstream had the request): maybe sent."""
    postmark.mode = mode
    p = provider(postmark.url, tmp_path, timeout=0.5)
    try:
        results = await p.send([message(1, "a@example.org")])
    finally:
        await p.aclose()
    assert [(r.ok, r.maybe_sent) for r in results] == [(False, True)]
    assert len(postmark.requests) == 1


async def test_connection_refused_is_certainly_not_sent(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    p = provider(f"http://127.0.0.1:{port}", tmp_path)
    try:
        [r] = await p.send([message(1, "a@example.org")])
    finally:
        await p.aclose()
    assert (r.ok, r.transient, r.maybe_sent) == (False, True, False)


@pytest.mark.parametrize("mode", ["garbled", "stall"])
async def test_delivery_records_a_batch_postmark_may_have_sent_unknown_and_never_resends_it(
        store: Store, tmp_path: Path, postmark: FakePostmark, mode: str) -> None:
    setup = make_kernel(store, tmp_path, provider="pm", options=(
        f'plugin = "postmark"\nserver_token = "{TOKEN}"\nbase_url = "{postmark.url}"\n'
        "timeout = 0.5\n"))
    await add_user(store, "u1", "ann@example.org", name="Ann")
    await add_user(store, "u2", "bob@example.org", name="Bob")
    ids = []
    async with store.begin() as conn:
        for user in ("u1", "u2"):
            ids.append(await enqueue(conn, kind="campaign", template="welcome",
                                     now=setup.clock.now(), user_id=user,
                                     dedupe_key=f"k-{user}", data={"plan": "pro"}))
    postmark.mode = mode
    svc = DeliveryService(setup.kernel)
    try:
        assert await svc.run_once() == 2
        postmark.mode = "normal"
        setup.clock.set(setup.clock.now() + dt.timedelta(days=1))
        assert await svc.run_once() == 0
    finally:
        await svc.provider.aclose()
    rows = [await message_row(store, i) for i in ids]
    assert [r["status"] for r in rows] == ["unknown", "unknown"]
    assert all("postmark" in r["last_error"] for r in rows)
    assert len(postmark.requests) == 1  # handed over once, never again


@pytest.mark.parametrize(("broadcast", "expected"), [("broadcast", "broadcast"),
                                                     (None, "outbound")])
async def test_marketing_mail_goes_to_the_broadcast_stream(
        postmark: FakePostmark, tmp_path: Path, broadcast: str | None, expected: str) -> None:
    """Postmark wants bulk mail on a broadcast stream: campaigns and broadcasts go to
    broadcast_stream (default: message_stream), transactional mail to message_stream."""
    opts = {} if broadcast is None else {"broadcast_stream": broadcast}
    p = provider(postmark.url, tmp_path, **opts)
    try:
        results = await p.send([message(1, "a@example.org", kind="campaign"),
                                message(2, "b@example.org", kind="broadcast"),
                                message(3, "c@example.org", kind="transaction")])
    finally:
        await p.aclose()
    assert all(r.ok for r in results)
    [batch] = postmark.requests
    assert [m["MessageStream"] for m in batch] == [expected, expected, "outbound"]
    assert {"Name": "Precedence", "Value": "bulk"} in batch[0]["Headers"]  # type: ignore[operator]
    assert {"Name": "Precedence", "Value": "bulk"} not in batch[2]["Headers"]  # type: ignore[operator]


@pytest.mark.parametrize(("mode", "token"), [("normal", "rotated-token"), ("500", TOKEN)])
async def test_a_refused_account_or_a_down_postmark_is_an_outage(
        postmark: FakePostmark, tmp_path: Path, mode: str, token: str) -> None:
    """A rotated token (HTTP 401, ErrorCode 10) or a 5xx: no message is at fault, so
    every one is an outage (held queued, no attempt spent), not a failure."""
    postmark.mode = mode
    p = PostmarkProvider(ProviderContext("pm", {"server_token": token,
                                                "base_url": postmark.url}, tmp_path))
    try:
        results = await p.send([message(1, "a@example.org"), message(2, "b@example.org")])
    finally:
        await p.aclose()
    assert [(r.ok, r.outage, r.maybe_sent) for r in results] == [(False, True, False)] * 2


async def test_a_recipient_refusal_is_no_outage(postmark: FakePostmark,
                                                tmp_path: Path) -> None:
    p = provider(postmark.url, tmp_path)
    try:
        [inactive] = await p.send([message(1, "inactive@example.org")])
    finally:
        await p.aclose()
    assert (inactive.ok, inactive.outage, inactive.suppress) == (False, False, True)
