"""The ses provider against moto's server: SES v2 SendEmail with raw MIME, SigV4-signed."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from delivery_harness import add_user, make_kernel, message_row
from moto.server import ThreadedMotoServer

from segflowd.delivery.mime import MessageParts, build_message
from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
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
