"""Shared set-up for the delivery tests: an app with templates, a config, a kernel.

``ScriptedProvider`` is a provider whose answers a test scripts; it records every
message it is handed. Tests that need a real provider use the real plugins.
"""

from __future__ import annotations

import dataclasses
import email
import email.message
import email.policy
import textwrap
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import Config, load_config
from segflowd.delivery.service import DeliveryService
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.providers import OutgoingMessage, SendResult
from segflowd.schema import messages, users
from segflowd.store import Store
from segflowd.testing import EPOCH, FakeClock

SECRET = "test-signing-key"
NOW = EPOCH

WELCOME = """\
{% extends "segflow/layout.html" %}
{% import "segflow/components.html" as ui %}
{% block preview %}Welcome, {{ user.name }}{% endblock %}
{% block content %}
{{ ui.heading("Hello " ~ user.name) }}
{% call ui.text() %}Your plan: {{ plan }}{% endcall %}
{{ ui.button("https://example.com/start?ref=welcome&x=1", "Get started") }}
{% endblock %}
"""

RECEIPT = """\
<html><body><p class="x">Receipt for {{ user.name }}: {{ amount }}</p>
<a href="https://example.com/orders">orders</a></body></html>
"""


def write_app(base: Path) -> Path:
    tpl = base / "templates"
    tpl.mkdir(parents=True, exist_ok=True)
    (tpl / "welcome.html").write_text(WELCOME)
    (tpl / "receipt.html").write_text(RECEIPT)
    (base / "flows.py").write_text(textwrap.dedent("""\
        from segflowd import Segflow

        app = Segflow(templates="templates")
        app.template("welcome", subject="Welcome {{ user.name }}!", html="welcome.html")
        app.template("tracked", subject="News for {{ user.name }}", html="welcome.html",
                     track=True)
        app.template("receipt", subject="Your receipt", html="receipt.html")
        app.template("headline", subject="{{ headline }}", html="receipt.html")
    """))
    return base / "flows.py"


def load_test_app(path: Path) -> Segflow:
    from segflowd.loader import load_app

    return load_app(str(path), path.parent)


def write_config(base: Path, provider: str = "scripted", options: str = "",
                 email_extra: str = "") -> Path:
    cfg = base / "segflow.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [daemon]
        app = "flows.py"
        [http]
        public_url = "https://mail.example.com"
        [email]
        from = "Example <hello@example.com>"
        reply_to = "support@example.com"
        provider = "{provider}"
        secret = "{SECRET}"
        retry_base = 60
        retry_max = 3600
        max_attempts = 3
        """) + email_extra + f"\n[providers.{provider}]\n" + options + "\n")
    return cfg


class ScriptedProvider:
    """Answers each message with the next scripted result (default: sent)."""

    def __init__(self, max_batch: int = 100) -> None:
        self.max_batch = max_batch
        self.sent: list[OutgoingMessage] = []
        self.script: list[SendResult] = []
        self.calls = 0

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls += 1
        out = []
        for msg in batch:
            self.sent.append(msg)
            out.append(self.script.pop(0) if self.script else
                       SendResult(ok=True, provider_message_id=f"p-{msg.id}"))
        return out

    async def aclose(self) -> None:
        return None


@dataclasses.dataclass
class Setup:
    kernel: Kernel
    clock: FakeClock
    config: Config


def make_kernel(store: Store, base: Path, provider: str = "scripted", options: str = "",
                email_extra: str = "") -> Setup:
    app_path = write_app(base)
    config = load_config(write_config(base, provider, options, email_extra), environ={})
    clock = FakeClock(NOW)
    kernel = Kernel(config=config, app=load_test_app(app_path), store=store, clock=clock,
                    bus=Bus(), metrics=Metrics())
    return Setup(kernel, clock, config)


def service(setup: Setup, provider: object | None = None) -> DeliveryService:
    providers = {setup.config.email.provider: provider} if provider is not None else None
    return DeliveryService(setup.kernel, providers=providers)  # type: ignore[arg-type]


async def add_user(store: Store, user_id: str, email_addr: str | None,
                   **attributes: object) -> None:
    async with store.begin() as conn:
        await conn.execute(sa.insert(users).values(
            id=user_id, email=email_addr, attributes=attributes, created_at=NOW,
            updated_at=NOW))


async def message_row(store: Store, mid: int) -> sa.RowMapping:
    async with store.connect() as conn:
        return (await conn.execute(sa.select(messages).where(messages.c.id == mid))
                ).mappings().one()


def parse(mime: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(mime, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg
