"""Topics through Simulation: a user who left the newsletter gets no newsletter campaign
mail, yet still gets a campaign without a topic; one who left everything gets neither."""

from __future__ import annotations

from pathlib import Path

import pytest

from segflowd.testing import Simulation

APP = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.topic("newsletter", title="Newsletter")
app.segment("everyone", sql="SELECT id FROM users")
app.template("digest", subject="Digest", html="mail.html")
app.template("notice", subject="Notice", html="mail.html")

@app.campaign("weekly", segments=["everyone"], topic="newsletter")
def weekly(ctx, rt):
    yield rt.wait(days=1)
    yield rt.send_email("digest")

@app.campaign("notices", segments=["everyone"])
def notices(ctx, rt):
    yield rt.wait(days=1)
    yield rt.send_email("notice")
"""


@pytest.fixture
def app_spec(tmp_path: Path) -> str:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "mail.html").write_text("<p>Hi {{ user.id }}</p>")
    (tmp_path / "app.py").write_text(APP)
    return f"{tmp_path / 'app.py'}:app"


def test_a_left_topic_stops_only_its_campaign(app_spec: str) -> None:
    with Simulation(app_spec, start="2026-03-02T09:00:00Z") as sim:
        for uid in ("ann", "bob", "cy"):
            sim.user(uid, email=f"{uid}@example.com")
        sim.subscriptions("ann", topics={"newsletter": False})
        sim.subscriptions("bob", all=False)
        with pytest.raises(ValueError, match=r"topics\.nope: unknown topic"):
            sim.subscriptions("cy", topics={"nope": False})
        sim.advance(days=2)
        sent = {u: sorted(m.template for m in sim.sent(u)) for u in ("ann", "bob", "cy")}
        suppressed = [(e.user_id, e.detail.get("error")) for e in sim.timeline()
                      if e.kind == "message.suppressed"]
    assert sent == {"ann": ["notice"], "bob": [], "cy": ["digest", "notice"]}
    assert ("ann", "user unsubscribed from topic 'newsletter'") in suppressed
    assert ("bob", "user unsubscribed from marketing messages") in suppressed
