"""A campaign's ``send_window``: its mail and SMS due outside the window are held until it
opens in the user's zone (their ``timezone``, else ``[daemon] default_timezone``), across
the DST changes of New York (8 March 2026) and Paris (29 March 2026); a zone that names
nothing falls back and is counted; a malformed window fails at definition, naming the
file and line. Through Simulation, whose delivery is the real one."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from segflowd import AppError, Segflow
from segflowd.testing import Simulation

START = dt.datetime(2026, 3, 6, 20, 0)  # Friday: 15:00 EST in New York, 21:00 CET in Paris

APP = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.segment("everyone", sql="SELECT id FROM users")
for name in ("hello", "again", "later", "receipt"):
    app.template(name, subject=name, html="plain.html")
app.sms_template("ping", text="Hi {{ user.name }}")
app.transaction("receipt", event="purchase", template="receipt")

@app.campaign("office-hours", segments=["everyone"],
              send_window=("09:00", "18:00", "mon-fri"))
def office_hours(ctx, rt):
    yield rt.send_email("hello")
    yield rt.wait(days=1)
    yield rt.send_email("again")
    if ctx.user.get("phone"):
        yield rt.send_sms("ping")
    yield rt.wait(days=20)
    yield rt.send_email("later")
"""


@pytest.fixture
def app_spec(tmp_path: Path) -> str:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "plain.html").write_text("<p>Hi {{ user.name }}</p>")
    (tmp_path / "app.py").write_text(APP)
    return f"{tmp_path / 'app.py'}:app"


def sent(sim: Simulation, user: str, channel: str = "email") -> list[tuple[str, dt.datetime]]:
    return sorted(((m.template, m.at) for m in sim.sent(user) if m.channel == channel),
                  key=lambda x: (x[1], x[0]))


def test_a_send_window_across_dst_changes_in_two_zones(app_spec: str) -> None:
    with Simulation(app_spec, start=START) as sim:
        sim.user("nina", email="nina@example.com", name="Nina", timezone="America/New_York",
                 phone="+1 212 555 0100")
        sim.user("pierre", email="pierre@example.com", name="Pierre",
                 timezone="Europe/Paris")
        sim.advance(days=30)
        # New York: "hello" at 15:00 EST goes at once. "again" and the SMS are due
        # Saturday: held until Monday 09:00, which after the change is EDT (13:00 UTC,
        # not 14:00). "later" is due Friday 27 March 16:00 EDT: inside, sent at once.
        assert sent(sim, "nina") == [
            ("hello", START),
            ("again", dt.datetime(2026, 3, 9, 13, 0)),
            ("later", dt.datetime(2026, 3, 27, 20, 0))]
        assert sent(sim, "nina", "sms") == [("ping", dt.datetime(2026, 3, 9, 13, 0))]
        # Paris: "hello" at 21:00 CET and "again" on Saturday wait for Monday 09:00 CET
        # (08:00 UTC); "later", due Friday 27 March 21:00 CET, waits over the weekend of
        # Paris's change for Monday 30 March 09:00 CEST (07:00 UTC).
        assert sent(sim, "pierre") == [
            ("again", dt.datetime(2026, 3, 9, 8, 0)),
            ("hello", dt.datetime(2026, 3, 9, 8, 0)),
            ("later", dt.datetime(2026, 3, 30, 7, 0))]
        held = [e for e in sim.timeline("pierre") if e.kind == "message.held"]
        assert [(e.at, e.detail["template"]) for e in held] == [
            (START, "hello"), (START + dt.timedelta(days=1), "again"),
            (dt.datetime(2026, 3, 27, 20, 0), "later")]
        assert held[0].detail["error"] == (
            "held for the send window 09:00-18:00 mon-fri (Europe/Paris) until "
            "2026-03-09T08:00:00Z")
        assert sim.engine.kernel.metrics.value("segflow_timezone_fallbacks_total",
                                               where="send_window") == 0


def test_transactional_mail_ignores_the_window(app_spec: str) -> None:
    with Simulation(app_spec, start=START) as sim:
        sim.user("pierre", email="pierre@example.com", name="Pierre",
                 timezone="Europe/Paris")
        sim.event("pierre", "purchase")  # Friday 21:00 in Paris: the receipt goes now
        sim.advance(hours=1)
        assert sent(sim, "pierre") == [("receipt", START)]


def test_an_unknown_timezone_uses_the_default_and_is_counted(app_spec: str) -> None:
    config = {"daemon": {"default_timezone": "Asia/Tokyo"}}
    with Simulation(app_spec, start=START, config=config) as sim:
        # Friday 20:00 UTC is Saturday 05:00 in Tokyo: held until Monday 09:00 JST.
        sim.user("zed", email="zed@example.com", name="Zed", timezone="Mars/Olympus")
        sim.user("una", email="una@example.com", name="Una")  # no attribute: no fallback
        sim.advance(days=1, hours=1)
        monday = dt.datetime(2026, 3, 9, 0, 0)  # 09:00 JST
        assert sim.engine.kernel.metrics.value("segflow_timezone_fallbacks_total",
                                               where="send_window") == 2  # hello, again
        sim.advance(days=2)
        assert sent(sim, "zed") == [("again", monday), ("hello", monday)]
        assert sent(sim, "una") == [("again", monday), ("hello", monday)]
        held = [e for e in sim.timeline("zed") if e.kind == "message.held"]
        assert "(Asia/Tokyo)" in str(held[0].detail["error"])


@pytest.mark.parametrize(("window", "what"), [
    (("09:00", "18:00", "weekdays"), "weekdays 'weekdays'"),
    (("9", "18:00"), 'must be "HH:MM"'),
    ("09:00-18:00", "a send window is"),
    (("09:00", "09:00"), "is empty"),
])
def test_a_malformed_window_fails_at_definition_naming_file_and_line(
        window: object, what: str) -> None:
    app = Segflow()
    with pytest.raises(AppError) as caught:
        app.campaign("c", segments=["s"], send_window=window)  # type: ignore[arg-type]
    here = f"{Path(__file__).name}:"
    message = str(caught.value)
    assert here in message
    assert "campaign 'c': send_window:" in message
    assert what in message
