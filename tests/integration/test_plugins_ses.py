"""The ses provider against moto's server: SES v2 SendEmail with raw MIME, SigV4-signed;
and against an SES-shaped loopback server for the answers moto does not give."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import httpx
import pytest
from delivery_harness import add_user, make_kernel, message_row
from moto.server import ThreadedMotoServer

from segflow_plugins.ses import SesProvider
from segflowd.delivery.mime import MessageParts, build_message
from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.providers import OutgoingMessage, ProviderContext
from segflowd.store import Store

pytestmark = pytest.mark.anyio

REGION = "eu-west-1"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("sesv2", region_name=REGION, endpoint_url=url,
                          aws_access_key_id="AKIDTEST", aws_secret_access_key="secret")
    client.create_email_identity(EmailIdentity="hello@example.com")
    try:
        yield url
    finally:
        server.stop()


def sent_raw(url: str) -> list[dict[str, object]]:
    data = httpx.get(f"{url}/moto-api/data.json").json()
    return list(data["ses"]["RawMessage"])


async def test_delivery_through_ses_reaches_moto(store: Store, tmp_path: Path,
                                                 moto_url: str) -> None:
    before = len(sent_raw(moto_url))
    setup = make_kernel(store, tmp_path, provider="aws", options=(
        f'plugin = "ses"\nregion = "{REGION}"\naccess_key_id = "AKIDTEST"\n'
        f'secret_access_key = "secret"\nendpoint_url = "{moto_url}"\n'))
    await add_user(store, "u1", "ann@example.org", name="Ann")
    await add_user(store, "u2", "bob@example.org", name="Bob")
    ids = []
    async with store.begin() as conn:
        for user in ("u1", "u2"):
            ids.append(await enqueue(conn, kind="campaign", template="welcome",
                                     now=setup.clock.now(), user_id=user,
                                     dedupe_key=f"k-{user}", data={"plan": "pro"}))
    svc = DeliveryService(setup.kernel)
    try:
        assert await svc.run_once() == 2
    finally:
        await svc.provider.aclose()
    rows = [await message_row(store, i) for i in ids]
    assert [r["status"] for r in rows] == ["sent", "sent"]
    new = sent_raw(moto_url)[before:]
    assert {tuple(set(m["destinations"])) for m in new} == {  # type: ignore[arg-type]
        ("ann@example.org",), ("bob@example.org",)}
    by_id = {m["id"]: m for m in new}
    raw = by_id[rows[0]["provider_message_id"]]["raw_data"]
    msg = email.message_from_string(str(raw), policy=email.policy.default)
    assert msg["Subject"] == "Welcome Ann!"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg.get_content_type() == "multipart/alternative"


async def test_unverified_sender_is_a_permanent_failure(store: Store, tmp_path: Path,
                                                         moto_url: str) -> None:
    setup = make_kernel(store, tmp_path, provider="aws", options=(
        f'plugin = "ses"\nregion = "{REGION}"\naccess_key_id = "AKIDTEST"\n'
        f'secret_access_key = "secret"\nendpoint_url = "{moto_url}"\n'))
    svc = DeliveryService(setup.kernel)
    msg = build_message(MessageParts(
        row_id=1, kind="transaction", sender="nobody@unverified.example", to="a@example.org",
        subject="x", html="<p>x</p>", text="x", message_id="1.x@unverified.example",
        date=setup.clock.now()))
    try:
        [result] = await svc.provider.send([msg])
    finally:
        await svc.provider.aclose()
    assert not result.ok
    assert not result.transient
    assert "ses HTTP 4" in (result.error or "")


# -- what a failure means: certainly not sent (retry) or maybe sent (unknown) -------------------

class FakeSes(ThreadingHTTPServer):
    """An SES-v2-shaped server on loopback for the failures moto cannot make. The recipient
    chooses the answer: ``garbled@`` a 200 whose body is not JSON, ``stall@`` no answer
    at all, ``rejected@`` a 400 MessageRejected, ``throttled@`` a 429; anyone else 200."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SesHandler)
        self.received: list[str] = []
        self.bodies: list[dict[str, object]] = []
        self.released = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _SesHandler(BaseHTTPRequestHandler):
    server: FakeSes

    def log_message(self, format: str, *args: object) -> None:  # stdlib's name
        return None

    def _answer(self, status: int, body: bytes, error_type: str = "") -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if error_type:
            self.send_header("x-amzn-ErrorType", error_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # the stdlib's handler name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        to = str(body["Destination"]["ToAddresses"][0])
        self.server.received.append(to)
        self.server.bodies.append(body)
        if to.startswith("stall@"):
            self.server.released.wait(30)
        elif to.startswith("garbled@"):
            self._answer(200, b"<html>maintenance</html>")
        elif to.startswith("rejected@"):
            self._answer(400, b'{"message": "Email address is not verified."}',
                         "MessageRejected")
        elif to.startswith("paused@"):
            self._answer(400, b'{"message": "Sending is paused for this account."}',
                         "SendingPausedException")
        elif to.startswith("forbidden@"):
            self._answer(403, b'{"message": "The security token included in the request '
                              b'is invalid."}', "UnrecognizedClientException")
        elif to.startswith("throttled@"):
            self._answer(429, b'{"message": "Maximum sending rate exceeded."}',
                         "TooManyRequestsException")
        else:
            self._answer(200, json.dumps({"MessageId": f"ses-{len(self.server.received)}"})
                         .encode())


@pytest.fixture
def fake_ses() -> Iterator[FakeSes]:
    server = FakeSes()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.released.set()
        server.shutdown()
        server.server_close()


def ses_provider(url: str, tmp_path: Path, **opts: object) -> SesProvider:
    return SesProvider(ProviderContext("aws", {
        "region": REGION, "access_key_id": "AKIDTEST", "secret_access_key": "secret",
        "endpoint_url": url, **opts}, tmp_path))


def outgoing(i: int, to: str, kind: str = "transaction") -> OutgoingMessage:
    return build_message(MessageParts(
        row_id=i, kind=kind, sender="hello@example.com", to=to, subject=f"m{i}",
        html=f"<p>{i}</p>", text=str(i), message_id=f"{i}.x@example.com",
        date=dt.datetime(2026, 1, 1)))


async def test_each_message_has_its_own_outcome_when_some_answers_are_broken(
        fake_ses: FakeSes, tmp_path: Path) -> None:
    """One broken answer in a batch neither fails the batch nor re-sends the rest."""
    p = ses_provider(fake_ses.url, tmp_path, timeout=0.5)
    try:
        ok, garbled, stall, rejected, throttled = await p.send([
            outgoing(1, "ann@example.org"), outgoing(2, "garbled@example.org"),
            outgoing(3, "stall@example.org"), outgoing(4, "rejected@example.org"),
            outgoing(5, "throttled@example.org")])
    finally:
        await p.aclose()
    assert ok.ok
    assert ok.provider_message_id
    assert (garbled.ok, garbled.maybe_sent) == (False, True)
    assert (stall.ok, stall.maybe_sent) == (False, True)
    assert (rejected.ok, rejected.maybe_sent, rejected.transient) == (False, False, False)
    assert (throttled.ok, throttled.maybe_sent, throttled.transient) == (False, False, True)


async def test_connection_refused_is_certainly_not_sent(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    p = ses_provider(f"http://127.0.0.1:{port}", tmp_path)
    try:
        [r] = await p.send([outgoing(1, "ann@example.org")])
    finally:
        await p.aclose()
    assert (r.ok, r.transient, r.maybe_sent) == (False, True, False)


async def test_delivery_through_ses_never_resends_what_ses_took(
        store: Store, tmp_path: Path, fake_ses: FakeSes) -> None:
    setup = make_kernel(store, tmp_path, provider="aws", options=(
        f'plugin = "ses"\nregion = "{REGION}"\naccess_key_id = "AKIDTEST"\n'
        f'secret_access_key = "secret"\nendpoint_url = "{fake_ses.url}"\ntimeout = 0.5\n'))
    people = {"u1": "ann@example.org", "u2": "garbled@example.org",
              "u3": "stall@example.org", "u4": "throttled@example.org"}
    ids = []
    async with store.begin() as conn:
        for user in people:
            ids.append(await enqueue(conn, kind="transaction", template="receipt",
                                     now=setup.clock.now(), user_id=user,
                                     dedupe_key=f"k-{user}", data={"amount": "1"}))
    for user, address in people.items():
        await add_user(store, user, address, name=user)
    svc = DeliveryService(setup.kernel)
    try:
        assert await svc.run_once() == 4
        statuses = [(await message_row(store, i))["status"] for i in ids]
        assert statuses == ["sent", "unknown", "unknown", "queued"]
        setup.clock.set(setup.clock.now() + dt.timedelta(days=1))
        assert await svc.run_once() == 1  # the throttled one, certainly not sent
    finally:
        await svc.provider.aclose()
    assert sorted(fake_ses.received) == sorted([*people.values(), "throttled@example.org"])


@pytest.mark.parametrize(("marketing_set", "expected"), [("bulk", "bulk"), (None, "tx")])
async def test_marketing_mail_goes_through_its_own_configuration_set(
        fake_ses: FakeSes, tmp_path: Path, marketing_set: str | None, expected: str) -> None:
    """Campaign and broadcast mail keeps its reputation apart: configuration_set_marketing
    (default: configuration_set); transactional mail stays on configuration_set."""
    opts: dict[str, object] = {"configuration_set": "tx"}
    if marketing_set is not None:
        opts["configuration_set_marketing"] = marketing_set
    p = ses_provider(fake_ses.url, tmp_path, **opts)
    try:
        results = await p.send([outgoing(1, "a@example.org", "campaign"),
                                outgoing(2, "b@example.org", "broadcast"),
                                outgoing(3, "c@example.org", "transaction")])
    finally:
        await p.aclose()
    assert all(r.ok for r in results)
    sets = {str(b["Destination"]["ToAddresses"][0]): b.get("ConfigurationSetName")  # type: ignore[index]
            for b in fake_ses.bodies}
    assert sets == {"a@example.org": expected, "b@example.org": expected,
                    "c@example.org": "tx"}


async def test_account_and_credential_errors_are_outages(fake_ses: FakeSes,
                                                         tmp_path: Path) -> None:
    """SendingPaused and a refused key say nothing about the message: an outage (held,
    no attempt spent); MessageRejected and throttling are not."""
    p = ses_provider(fake_ses.url, tmp_path)
    try:
        paused, forbidden, rejected, throttled = await p.send([
            outgoing(1, "paused@example.org"), outgoing(2, "forbidden@example.org"),
            outgoing(3, "rejected@example.org"), outgoing(4, "throttled@example.org")])
    finally:
        await p.aclose()
    assert [(r.ok, r.outage) for r in (paused, forbidden, rejected, throttled)] == [
        (False, True), (False, True), (False, False), (False, False)]
    assert "SendingPausedException" in (paused.error or "")
