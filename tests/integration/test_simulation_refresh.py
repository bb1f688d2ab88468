"""A simulation that skips the looks whose answer cannot have changed finds every entry
and exit at the same moment as one that looks before every due refresh.

The app mixes what :func:`segflowd.simrefresh.time_binds` follows (Core and raw SQL
compared with stored dates, a window that is entered and left again, no time at all, a
segment over the outbox) with what it cannot (a bind inside a function), and users
arrive, log in and buy at different times.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

import segflowd.simrefresh
from segflowd.testing import Simulation

START = dt.datetime(2026, 3, 1, 9, 0)

APP = """\
from sqlalchemy import select
from segflowd import Segflow, ago
from segflowd.schema import users

app = Segflow(templates="templates")

@app.segment("fortnight", refresh="1h")
def fortnight():
    return select(users.c.id).where(users.c.created_at < ago(days=7),
                                    users.c.created_at >= ago(days=14))

app.segment("lapsed", refresh="15m", params={"cutoff": ago(days=3)},
            sql="SELECT user_id AS id FROM events WHERE name = 'login' "
                "GROUP BY user_id HAVING MAX(created_at) < :cutoff")
app.segment("shifted", refresh="2h", params={"cutoff": ago(days=1)},
            sql="SELECT user_id AS id FROM events WHERE name = 'login' "
                "AND julianday(created_at) + 2 < julianday(:cutoff)")
app.segment("buyers", refresh="30m",
            sql="SELECT user_id AS id FROM events WHERE name = 'purchase'")
app.segment("mailed", refresh="45m",
            sql="SELECT user_id AS id FROM messages WHERE template = 'hello'")

@app.campaign("hello", segments=["fortnight"], behavior="dynamic")
def hello(ctx, rt):
    yield rt.send_email("hello")
    yield rt.wait(days=30)

app.template("hello", subject="Hello", html="hello.html")
"""


def run(spec: str) -> tuple[list[tuple[dt.datetime, str, str, str]], int, int]:
    """(segment entries and exits, due refreshes looked at, of them probed)."""
    with Simulation(spec, start=START) as sim:
        for i, user in enumerate(["ann", "bob", "cat", "dan"]):
            sim.user(user, email=f"{user}@example.com")
            sim.event(user, "login", at=START - dt.timedelta(days=i))
            sim.advance(hours=13 * i + 5)
        sim.event("bob", "purchase")
        sim.advance(days=4)
        sim.event("cat", "login")
        sim.event("ann", "login")
        sim.advance(days=9, hours=7)
        sim.event("dan", "purchase")
        sim.advance(days=8)
        changes = [(e.at, e.kind, e.user_id, str(e.detail.get("segment")))
                   for e in sim.timeline() if e.kind.startswith("segment.")]
        schedule = sim.engine.schedule
        return changes, schedule.looked, schedule.probed


@pytest.fixture
def spec(tmp_path: Path) -> str:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "hello.html").write_text("<p>Hello</p>")
    (tmp_path / "app.py").write_text(APP)
    return f"{tmp_path / 'app.py'}:app"


def test_skipped_looks_change_no_entry_or_exit(spec: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    skipping, looked, probed = run(spec)
    monkeypatch.setattr(segflowd.simrefresh, "time_binds", lambda seg: None)
    every, looked_every, probed_every = run(spec)
    assert skipping == every
    kinds = {(kind, segment) for _, kind, _, segment in every}
    for segment in ("fortnight", "lapsed", "shifted", "mailed"):
        assert ("segment.entered", segment) in kinds
    assert ("segment.exited", "fortnight") in kinds
    assert ("segment.exited", "lapsed") in kinds
    # Ann, created at the start, is in the window from the first hourly refresh after
    # her seventh day until the first after her fourteenth.
    ann = [(at - START, kind) for at, kind, user, segment in every
           if user == "ann" and segment == "fortnight"]
    assert ann == [(dt.timedelta(days=7, hours=1), "segment.entered"),
                   (dt.timedelta(days=14, hours=1), "segment.exited")]
    assert looked == looked_every == probed_every
    assert probed < looked_every / 5  # and the looks were mostly skipped
