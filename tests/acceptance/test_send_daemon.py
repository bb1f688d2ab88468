"""A running segflowd (a subprocess, SQLite) takes a transactional send from the official
``customerio`` library's App API client (``APIClient.send_email``) and from segflowd's own
client, and delivers both through the file outbox; a ``track`` key cannot send or read."""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
from customerio.api import APIClient, SendEmailRequest
from customerio.client_base import CustomerIOException
from daemon_harness import API_SECRET, RunningDaemon, running_daemon, store_rows

from segflowd.client import SegflowAPIError, SyncSegflowClient
from segflowd.schema import messages

pytestmark = pytest.mark.slow

APP_KEY, TRACK_KEY = "app-secret", "public-write-key"
SEND_TIMEOUT = 30.0  # seconds for a message to appear in the outbox folder
APP = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.template("receipt", subject="Receipt {{ order }}", html="receipt.html")
app.transaction("order_receipt", event="order", template="receipt")
"""
RECEIPT = "<html><body><p>Order {{ order }} for {{ user.name }}</p></body></html>"
KEYS = f"""
[[http.keys]]
name = "mailer"
secret = "{APP_KEY}"
scope = "app"
[[http.keys]]
name = "browser"
secret = "{TRACK_KEY}"
scope = "track"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    folder = tmp_path_factory.mktemp("send")
    url = f"sqlite+aiosqlite:///{folder}/segflow.db"
    with running_daemon(folder / "d", store_url=url, app=APP, extra=KEYS,
                        files={"templates/receipt.html": RECEIPT},
                        env={"SEGFLOW_EMAIL_POLL_INTERVAL": "0.2"}) as d:
        with SyncSegflowClient(d.base_url, API_SECRET) as sf:
            sf.create_user("u1", {"email": "ann@example.com", "name": "Ann"})
        yield d


def delivered(d: RunningDaemon, count: int) -> list[email.message.EmailMessage]:
    outbox = d.config_path.parent / "var" / "outbox"
    deadline = time.monotonic() + SEND_TIMEOUT
    while True:
        files = sorted(outbox.glob("*.eml")) if outbox.exists() else []
        if len(files) >= count:
            break
        assert time.monotonic() < deadline, f"{len(files)} of {count} messages delivered"
        time.sleep(0.1)
    out = []
    for f in files:
        msg = email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        out.append(msg)
    return out


def test_customerio_send_email_and_client_send_are_delivered(daemon: RunningDaemon) -> None:
    api = APIClient(APP_KEY, url=daemon.base_url, retries=0)
    reply = api.send_email(SendEmailRequest(
        transactional_message_id="order_receipt", identifiers={"id": "u1"},
        message_data={"order": "A-1"}, subject="Order {{ order }} is paid"))
    assert set(reply) == {"delivery_id", "queued_at"}
    with SyncSegflowClient(daemon.base_url, APP_KEY) as sf:
        mid = sf.send("receipt", user_id="u1", to="ann.other@example.com",
                      data={"order": "B-2"})
    msgs = delivered(daemon, 2)
    by_subject = {str(m["Subject"]): m for m in msgs}
    assert set(by_subject) == {"Order A-1 is paid", "Receipt B-2"}  # the send's own subject
    assert by_subject["Order A-1 is paid"]["To"] == "ann@example.com"
    assert by_subject["Receipt B-2"]["To"] == "ann.other@example.com"
    rows = store_rows(daemon.store_url, sa.select(messages.c.id, messages.c.transaction,
                                                  messages.c.status).order_by(messages.c.id))
    assert [(str(r["id"]), r["transaction"]) for r in rows] == [
        (reply["delivery_id"], "order_receipt"), (str(mid), None)]


def test_customerio_send_email_refuses_a_track_key_and_bad_input(
        daemon: RunningDaemon) -> None:
    public = APIClient(TRACK_KEY, url=daemon.base_url, retries=0)
    with pytest.raises(CustomerIOException, match="403"):
        public.send_email(SendEmailRequest(transactional_message_id="receipt",
                                           identifiers={"id": "u1"}))
    api = APIClient(APP_KEY, url=daemon.base_url, retries=0)
    with pytest.raises(CustomerIOException, match="400"):
        api.send_email(SendEmailRequest(transactional_message_id="receipt",
                                        identifiers={"id": "u1"}, subject="{{ broken"))
    r = httpx.get(f"{daemon.base_url}/v1/users/u1",
                  headers={"Authorization": f"Bearer {TRACK_KEY}"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    with SyncSegflowClient(daemon.base_url, TRACK_KEY) as sf, \
            pytest.raises(SegflowAPIError) as info:
        sf.send("receipt", user_id="u1")
    assert info.value.status == 403
