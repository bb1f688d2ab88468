"""A campaign that texts, tested through Simulation: SMS are rendered and handed over
like mail (``sim.sent()`` with ``channel="sms"``), quiet hours hold them in simulated
time, and a user without a valid number gets none."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from segflowd.testing import Simulation

APP = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.segment("everyone", sql="SELECT id FROM users")
app.sms_template("hello", text="Hi {{ user.name }}, welcome! {{ code }}")
app.sms_template("later", text="Still there, {{ user.name }}?")
app.template("mail", subject="Welcome", html="mail.html")

@app.campaign("onboarding", segments=["everyone"])
def onboarding(ctx, rt):
    yield rt.send_sms("hello", code="A1")
    yield rt.send_email("mail")
    yield rt.wait(hours=14)
    yield rt.send_sms("later")
"""


@pytest.fixture
def app_spec(tmp_path: Path) -> str:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "mail.html").write_text("<p>Hi {{ user.name }}</p>")
    (tmp_path / "app.py").write_text(APP)
    return f"{tmp_path / 'app.py'}:app"


def test_a_campaign_texts_and_mails_in_simulated_time(app_spec: str) -> None:
    config = {"sms": {"quiet_hours": "21:00-08:00"}, "daemon": {"default_timezone": "UTC"}}
    with Simulation(app_spec, start="2026-03-01T09:00:00Z", config=config) as sim:
        sim.user("ann", email="ann@example.com", name="Ann", phone="+44 7911 123456")
        sim.user("bob", email="bob@example.com", name="Bob", phone="12345")
        sim.advance(days=2)
        ann = sim.sent("ann")
        # At one moment delivery hands over each channel's batch in turn: order by time.
        assert sorted((m.at, m.channel, m.template) for m in ann) == [
            (dt.datetime(2026, 3, 1, 9, 0), "email", "mail"),
            (dt.datetime(2026, 3, 1, 9, 0), "sms", "hello"),
            (dt.datetime(2026, 3, 2, 8, 0), "sms", "later")]
        hello = next(m for m in ann if m.template == "hello")
        later = next(m for m in ann if m.template == "later")
        assert hello.to == "+447911123456"
        assert hello.text == "Hi Ann, welcome! A1"
        assert hello.at == dt.datetime(2026, 3, 1, 9, 0)
        # Due at 23:00 UTC, inside the quiet hours: held until they end at 08:00.
        assert later.at == dt.datetime(2026, 3, 2, 8, 0)
        # Bob's number is invalid: his mail goes, his SMS fail without a send.
        assert [(m.channel, m.template) for m in sim.sent("bob")] == [("email", "mail")]
        failed = [e for e in sim.timeline("bob") if e.kind == "message.failed"]
        assert len(failed) == 2
        assert all("no country code" in str(e.detail.get("error")) for e in failed)
