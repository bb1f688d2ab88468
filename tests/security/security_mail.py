"""Mail through the daemon's real delivery path, for the link-token and header tests.

An app with one tracked campaign template; users are written over the ingest API, a
campaign message is queued in the outbox table, the running daemon's delivery renders
it and the built-in ``outbox`` provider writes the ``.eml`` file read back here.
"""

from __future__ import annotations

import dataclasses
import email
import email.message
import email.policy
import json
from pathlib import Path

import anyio
import sqlalchemy as sa
from asgi_daemon import asgi_call
from daemon_harness import API_SECRET

from segflowd.app import Segflow
from segflowd.daemon import Daemon
from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.schema import messages

__all__ = ["SIGNING_KEY", "Delivered", "deliver", "mail_app", "put_user"]

SIGNING_KEY = "security-signing-key"  # [email] secret, given as SEGFLOW_EMAIL_SECRET
DELIVERY_TIMEOUT = 20.0  # seconds for a queued message to reach a final status
FINAL = ("sent", "failed", "suppressed", "unknown")
OFFER = "https://example.com/offer?x=1"

NEWS_HTML = f"""<html><body>
<p>Hello {{{{ user.name }}}}, your plan: {{{{ plan }}}}</p>
<p><a href="{OFFER}">See the offer</a></p>
<p><a href="{{{{ unsubscribe_url }}}}" data-segflow-notrack>Unsubscribe</a></p>
</body></html>
"""


def mail_app(folder: Path) -> Segflow:
    """One tracked template whose subject holds a user attribute and a data value."""
    templates = folder / "templates"
    templates.mkdir(parents=True, exist_ok=True)
    (templates / "news.html").write_text(NEWS_HTML, encoding="utf-8")
    app = Segflow(templates=templates)
    app.template("news", subject="News for {{ user.name }} on {{ plan }}", html="news.html",
                 track=True)
    return app


async def put_user(d: Daemon, user_id: str, attributes: dict[str, object]) -> None:
    """Create or update the user through the native API (the way data gets in)."""
    reply = await asgi_call(
        d.router, "PUT", f"/v1/users/{user_id}".encode(),
        [(b"authorization", f"Bearer {API_SECRET}".encode()),
         (b"content-type", b"application/json")],
        json.dumps({"attributes": attributes}).encode())
    assert reply.status == 200, reply.body


@dataclasses.dataclass(frozen=True)
class Delivered:
    id: int
    status: str
    last_error: str | None
    eml: bytes | None  # the file the outbox provider wrote, if the message was sent

    def parsed(self) -> email.message.EmailMessage:
        assert self.eml is not None
        msg = email.message_from_bytes(self.eml, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg


async def deliver(d: Daemon, user_id: str, **data: object) -> Delivered:
    """Queue a campaign message of template ``news`` to the user and wait for delivery."""
    async with d.store.begin() as conn:
        mid = await enqueue(conn, kind="campaign", template="news", now=d.clock.now(),
                            user_id=user_id, dedupe_key=None, data=data, campaign="security")
    assert mid is not None
    for service in d.services:
        if isinstance(service, DeliveryService):
            service.wake()
    with anyio.fail_after(DELIVERY_TIMEOUT):
        while True:
            async with d.store.connect() as conn:
                row = (await conn.execute(sa.select(messages.c.status, messages.c.last_error)
                                          .where(messages.c.id == mid))).one()
            if row.status in FINAL:
                break
            await anyio.sleep(0.02)
    outbox = d.config.base_dir / "var" / "outbox"
    files = sorted(outbox.glob(f"{mid:08d}-*.eml")) if outbox.is_dir() else []
    assert len(files) <= 1
    return Delivered(mid, row.status, row.last_error, files[0].read_bytes() if files else None)
