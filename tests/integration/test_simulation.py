"""segflowd.testing.Simulation: the real engines under a virtual clock, from sync tests.

The example app's own campaign tests are examples/saas/test_campaigns.py; these cover
the rest of the contract: time, engagement, conditions, config, bad input.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from segflowd.errors import AppError
from segflowd.testing import Simulation

START = dt.datetime(2026, 3, 1, 9, 0)
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = f"{ROOT / 'examples' / 'saas' / 'flows.py'}:app"

APP = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.segment("everyone", sql="SELECT id FROM users")
app.segment("vip", sql="SELECT user_id AS id FROM events WHERE name = 'vip'")

@app.campaign("news", segments=["everyone"], exclude=["vip"], behavior="dynamic")
def news(ctx, rt):
    yield rt.send_email("news")
    yield rt.wait(hours=6)
    if (yield rt.opened("news")):
        yield rt.send_email("thanks")
    elif (yield rt.clicked("news")):
        yield rt.send_email("thanks")
    else:
        yield rt.send_email("nudge")
    yield rt.wait(days=1)
    if (yield rt.condition("crm", "SELECT plan = 'pro' AS result FROM accounts "
                                  "WHERE id = <%= profile_id %>")):
        yield rt.send_email("pro")

app.template("news", subject="News for {{ user.name }}", html="news.html", track=True)
app.template("thanks", subject="Thanks", html="plain.html")
app.template("nudge", subject="Did you see it?", html="plain.html")
app.template("pro", subject="Pro tips", html="plain.html")
"""


@pytest.fixture
def app_spec(tmp_path: Path) -> str:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "news.html").write_text(
        '<p>Hi {{ user.name }}</p><a href="https://example.com/read">read</a>')
    (tmp_path / "templates" / "plain.html").write_text("<p>{{ user.name }}</p>")
    (tmp_path / "app.py").write_text(APP)
    return f"{tmp_path / 'app.py'}:app"


@pytest.fixture
def sim(app_spec: str) -> Iterator[Simulation]:
    with Simulation(app_spec, start="2026-03-01T09:00:00Z") as s:
        s.source("crm", lambda sql, params: params["profile_id"] == "pat")
        yield s


def sent(s: Simulation, user: str) -> list[tuple[str, float]]:
    return [(m.template, (m.at - START).total_seconds() / 3600) for m in s.sent(user)]


def test_waits_fire_at_their_due_time_in_order(sim: Simulation) -> None:
    sim.user("ann", email="ann@example.com", name="Ann")
    sim.advance(days=3)
    assert sent(sim, "ann") == [("news", 0), ("nudge", 6)]
    assert sim.now == START + dt.timedelta(days=3)
    kinds = [e.kind for e in sim.timeline("ann")]
    assert kinds[:2] == ["segment.entered", "flow.started"]
    assert kinds[-1] == "flow.completed"
    assert all(a.at <= b.at for a, b in zip(sim.timeline(), sim.timeline()[1:], strict=False))


def test_advance_stops_at_each_wait_inside_it(sim: Simulation) -> None:
    sim.user("ann", email="ann@example.com", name="Ann")
    for _ in range(6):
        sim.advance(hours=1)
    assert sent(sim, "ann") == [("news", 0), ("nudge", 6)]


def test_an_open_drives_rt_opened(sim: Simulation) -> None:
    sim.user("ann", email="ann@example.com", name="Ann")
    sim.user("bob", email="bob@example.com", name="Bob")
    sim.advance(hours=1)
    sim.open(sim.sent("ann")[0])
    assert sim.timeline("ann")[-1].kind == "message.opened"
    sim.advance(hours=6)
    assert [t for t, _ in sent(sim, "ann")] == ["news", "thanks"]
    assert [t for t, _ in sent(sim, "bob")] == ["news", "nudge"]


def test_a_click_drives_rt_clicked(sim: Simulation) -> None:
    sim.user("ann", email="ann@example.com", name="Ann")
    news = sim.sent("ann")[0]
    assert "/t/c/" in news.html  # tracked links: the click goes through the redirect
    sim.click(news, "https://example.com/read")
    entry = sim.timeline("ann")[-1]
    assert (entry.kind, entry.detail["url"]) == ("message.clicked", "https://example.com/read")
    sim.advance(hours=7)
    assert [t for t, _ in sent(sim, "ann")] == ["news", "thanks"]


def test_a_source_answer_decides_rt_condition(sim: Simulation) -> None:
    seen: list[tuple[str, dict[str, object]]] = []

    def crm(sql: str, params: dict[str, object]) -> object:
        seen.append((sql, params))
        return {"result": params["profile_id"] == "pat"}  # a row, as the database gives

    sim.source("crm", crm)
    sim.user("pat", email="pat@example.com", name="Pat")
    sim.user("sam", email="sam@example.com", name="Sam")
    sim.advance(days=2)
    assert [t for t, _ in sent(sim, "pat")] == ["news", "nudge", "pro"]
    assert [t for t, _ in sent(sim, "sam")] == ["news", "nudge"]
    assert {p["profile_id"] for _, p in seen} == {"pat", "sam"}
    assert "FROM accounts" in seen[0][0]


def test_a_condition_on_a_source_without_an_answer_fails_the_flow(app_spec: str) -> None:
    with Simulation(app_spec, start=START) as sim:
        sim.user("ann", email="ann@example.com", name="Ann")
        sim.advance(days=2)
        failed = [e for e in sim.timeline("ann") if e.kind == "flow.failed"]
    assert len(failed) == 1
    assert "crm" in str(failed[0].detail["error"])


def test_a_dynamic_flow_ends_when_an_event_moves_the_user_out(sim: Simulation) -> None:
    sim.user("ann", email="ann@example.com", name="Ann")
    sim.advance(hours=2)
    sim.event("ann", "vip", level=3)
    assert [e.kind for e in sim.timeline("ann")[-3:]] == [
        "event.ingested", "segment.entered", "flow.exited"]
    sim.advance(days=2)
    assert [t for t, _ in sent(sim, "ann")] == ["news"]


def test_forty_days_take_no_wall_clock_time() -> None:
    with Simulation(EXAMPLE, start=START) as sim:
        for uid in ("ann", "bob", "cat"):
            sim.user(uid, email=f"{uid}@example.com", name=uid.title())
            sim.event(uid, "login", at="2026-01-01T00:00:00Z")
        started = time.perf_counter()
        sim.advance(days=40)
        elapsed = time.perf_counter() - started
        assert sim.now == START + dt.timedelta(days=40)
        assert len(sim.sent()) == 3 * (3 + 3)  # onboarding and winback, three each
    assert elapsed < 10  # about half a second on an idle machine; nothing sleeps


def test_config_dict_sets_the_sender(app_spec: str) -> None:
    config = {"email": {"from": "Shop <shop@example.com>"}}
    with Simulation(app_spec, start=START, config=config) as sim:
        sim.user("ann", email="ann@example.com", name="Ann")
        msg = email.message_from_bytes(sim.sent("ann")[0].mime, policy=email.policy.default)
    assert msg["From"] == "Shop <shop@example.com>"
    assert msg["To"] == "ann@example.com"
    assert msg["Subject"] == "News for Ann"


def test_a_segflow_toml_is_used_but_never_its_store(tmp_path: Path, app_spec: str) -> None:
    store = tmp_path / "real.db"
    cfg = tmp_path / "segflow.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [daemon]
        app = "app.py"
        [store]
        url = "sqlite+aiosqlite:///{store}"
        [email]
        from = "Toml <toml@example.com>"
        """))
    with Simulation(app_spec, start=START, config=cfg) as sim:
        sim.user("ann", email="ann@example.com", name="Ann")
        assert b"toml@example.com" in sim.sent("ann")[0].mime
    assert not store.exists()


def test_bad_input_raises_value_error_naming_it(sim: Simulation) -> None:
    with pytest.raises(ValueError, match="unknown user 'zed'"):
        sim.event("zed", "login")
    sim.user("ann", email="ann@example.com")
    with pytest.raises(ValueError, match="at: not an ISO 8601 time"):
        sim.event("ann", "login", at="yesterday")
    with pytest.raises(ValueError, match="later than the simulation's clock"):
        sim.event("ann", "login", at="2026-03-02T00:00:00Z")
    with pytest.raises(ValueError, match="event '' of user 'ann'"):
        sim.event("ann", "")  # the HTTP API's own check
    with pytest.raises(ValueError, match="positive duration"):
        sim.advance(days=-1)
    with pytest.raises(ValueError, match="unknown user"):
        sim.timeline("zed")


def test_a_simulation_must_be_entered(app_spec: str) -> None:
    sim = Simulation(app_spec, start=START)
    with pytest.raises(RuntimeError, match="with Simulation"):
        sim.user("ann")


def test_an_app_that_does_not_load_is_an_app_error(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import nope_not_a_module\n")
    with pytest.raises(AppError, match="nope_not_a_module"):
        Simulation(f"{tmp_path / 'app.py'}:app", start=START)


def test_scheduled_refreshes_find_exits_at_their_time() -> None:
    """new-users (refresh="1h", created within 7 days) lets Ann go at the first refresh
    after her seventh day; nothing else about her changes in between."""
    with Simulation(EXAMPLE, start=START) as sim:
        sim.user("ann", email="ann@example.com", name="Ann")
        sim.advance(days=10)
        exits = [e for e in sim.timeline("ann") if e.kind == "segment.exited"]
    assert [(e.detail["segment"], e.at) for e in exits] == [
        ("new-users", START + dt.timedelta(days=7, hours=1))]


def test_a_frozen_clock_keeps_the_evaluation_rate_bounded() -> None:
    """Ingest at one simulated moment: the segment engine's evaluation-rate history has
    one entry for that moment, not one per evaluation (it was summed at every settle)."""
    with Simulation(EXAMPLE, start=START) as sim:
        for i in range(20):
            sim.user(f"u{i}", email=f"u{i}@example.com")
        segments = sim.engine.segments
        assert segments.statistics().evaluated >= 20
        assert len(segments._rate) == 1


def test_a_marketing_provider_in_the_config_is_never_used(app_spec: str) -> None:
    """Mail goes to memory whatever the config says, provider_marketing included."""
    config = {"email": {"provider": "pm", "provider_marketing": "pm"},
              "http": {"public_url": "https://mail.example.com"},
              "providers": {"pm": {"plugin": "postmark", "server_token": "x",
                                   "base_url": "http://127.0.0.1:9"}}}
    with Simulation(app_spec, start=START, config=config) as sim:
        sim.user("ann", email="ann@example.com", name="Ann")
        assert [m.template for m in sim.sent("ann")] == ["news"]
