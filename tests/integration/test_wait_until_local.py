"""``rt.wait_until_local``: the next matching wall-clock time in the user's zone, across
DST changes; the decision is made once and journaled, so a restart (replay) or a later
change of the user's zone keeps it; an unknown ``timezone`` attribute uses the default
and is counted; bad literal arguments are ``segflowd check`` problems naming file and
line."""

from __future__ import annotations

import datetime as dt
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_flows import DAY, Harness, make_app

from segflowd.cli.commands import main
from segflowd.schema import flow_journal
from segflowd.store import Store
from segflowd.testing import Simulation

FRIDAYS = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.segment("everyone", sql="SELECT id FROM users")
app.template("digest", subject="digest", html="plain.html")

@app.campaign("friday-digest", segments=["everyone"])
def friday_digest(ctx, rt):
    for _ in range(5):
        yield rt.wait_until_local(hour=9, minute=30, weekdays="fri")
        yield rt.send_email("digest")
"""


@pytest.fixture
def app_spec(tmp_path: Path) -> str:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "plain.html").write_text("<p>Hi {{ user.email }}</p>")
    (tmp_path / "app.py").write_text(FRIDAYS)
    return f"{tmp_path / 'app.py'}:app"


def digests(sim: Simulation, user: str) -> list[dt.datetime]:
    return sorted(m.at for m in sim.sent(user))


def test_wait_until_local_follows_the_wall_clock_across_dst(app_spec: str) -> None:
    """Friday 09:30 local, five weeks running, from Thursday 5 March 2026: New York moves
    to EDT on 8 March, Paris to CEST on 29 March; each digest keeps 09:30 local."""
    with Simulation(app_spec, start="2026-03-05T12:00:00Z") as sim:
        sim.user("nina", email="nina@example.com", timezone="America/New_York")
        sim.user("pierre", email="pierre@example.com", timezone="Europe/Paris")
        sim.user("ulla", email="ulla@example.com")  # no zone: the default, UTC
        sim.advance(days=35)
        fridays = [dt.date(2026, 3, 6) + dt.timedelta(weeks=i) for i in range(5)]

        def at(hour: int, day: dt.date) -> dt.datetime:
            return dt.datetime.combine(day, dt.time(hour, 30))

        assert digests(sim, "nina") == [at(14, fridays[0])] + [at(13, d) for d in fridays[1:]]
        assert digests(sim, "pierre") == [at(8, d) for d in fridays[:4]] + [at(7, fridays[4])]
        assert digests(sim, "ulla") == [at(9, d) for d in fridays]
        assert sim.engine.kernel.metrics.value("segflow_timezone_fallbacks_total",
                                               where="wait_until_local") == 0


def test_an_unknown_timezone_waits_in_the_default_zone_and_is_counted(app_spec: str) -> None:
    config = {"daemon": {"default_timezone": "Asia/Tokyo"}}
    with Simulation(app_spec, start="2026-03-05T12:00:00Z", config=config) as sim:
        sim.user("zed", email="zed@example.com", timezone="Mars/Olympus")
        sim.user("kai", email="kai@example.com")  # no attribute: the default, not counted
        sim.advance(days=8)
        # Friday 09:30 JST is 00:30 UTC.
        tokyo = [dt.datetime(2026, 3, 6, 0, 30), dt.datetime(2026, 3, 13, 0, 30)]
        assert digests(sim, "zed") == tokyo
        assert digests(sim, "kai") == tokyo
        # zed's three waits so far each fell back once; kai's none.
        assert sim.engine.kernel.metrics.value("segflow_timezone_fallbacks_total",
                                               where="wait_until_local") == 3


@pytest.fixture
def h(store: Store, tmp_path: Path) -> Harness:
    return Harness(store, tmp_path)


def mornings(ctx: Any, rt: Any) -> Generator[object, object, None]:
    yield rt.wait_until_local(hour=9, weekdays="mon-fri")
    yield rt.send_email("first")
    yield rt.wait_until_local(hour=9, weekdays="mon-fri")
    yield rt.send_email("second")


async def journaled(store: Store) -> list[object]:
    fj = flow_journal.c
    async with store.connect() as conn:
        return list((await conn.execute(sa.select(fj.result).where(
            fj.kind == "wait_until_local").order_by(fj.seq))).scalars())


@pytest.mark.anyio
async def test_a_restart_and_a_changed_zone_keep_the_journaled_wake_time(
        h: Harness) -> None:
    """NOW is Sunday 1 March 2026, 09:00 UTC. Pia's first wait is decided in Paris
    (Monday 09:00 CET, 08:00 UTC) and journaled. The daemon stops; she moves to New York;
    on restart the instance replays its journal and still wakes at 08:00 UTC (03:00 in
    New York). Her next wait, decided after the move, is that Monday's 09:00 EST (14:00
    UTC)."""
    app = make_app("mornings", mornings)
    await h.user("pia", timezone="Europe/Paris")
    async with h.running(app):
        await h.join("pia", "seg")
        await h.advance(3600)
        assert await journaled(h.store) == [
            {"at": "2026-03-02T08:00:00", "zone": "Europe/Paris", "fallback": False}]
    await h.user("pia", timezone="America/New_York")
    async with h.running(app):
        await h.advance(3 * DAY)
    assert await h.sent("pia") == [("first", round(23 / 24, 2)), ("second", round(29 / 24, 2))]
    assert await journaled(h.store) == [
        {"at": "2026-03-02T08:00:00", "zone": "Europe/Paris", "fallback": False},
        {"at": "2026-03-02T14:00:00", "zone": "America/New_York", "fallback": False}]
    (inst,) = await h.instances("pia")
    assert inst.status == "completed"


def bad_argument(ctx: Any, rt: Any) -> Generator[object, object, None]:
    yield rt.wait_until_local(hour=9, timezone="Europe/Pariss")
    yield rt.send_email("never")


@pytest.mark.anyio
async def test_a_bad_argument_fails_only_that_instance_saying_why(h: Harness) -> None:
    app = make_app("bad", bad_argument)
    await h.user("ann")
    async with h.running(app):
        await h.join("ann", "seg")
    (inst,) = await h.instances("ann")
    assert inst.status == "failed"
    assert "unknown time zone 'Europe/Pariss'" in inst.error
    assert await h.sent("ann") == []


CHECKED = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.segment("everyone", sql="SELECT id FROM users")
app.template("digest", subject="digest", html="plain.html")
ZONE = "Europe/Atlantis"

@app.campaign("digest", segments=["everyone"])
def digest(ctx, rt):
    yield rt.wait_until_local(hour=9, weekdays="mon-fri")
    yield rt.wait_until_local(hour=25)
    yield rt.wait_until_local(hour=9, weekdays="weekdays")
    yield rt.wait_until_local(hour=9, timezone=ZONE)
    yield rt.wait_until_local(hour=ctx.user.get("hour"))
    yield rt.send_email("digest")
"""


def checked_app(tmp_path: Path, sqlite_url: str, app: str, extra: str = "") -> Path:
    (tmp_path / "templates").mkdir(exist_ok=True)
    (tmp_path / "templates" / "plain.html").write_text("<p>Hi</p>")
    (tmp_path / "flows.py").write_text(app)
    config = tmp_path / "segflow.toml"
    config.write_text(f'[daemon]\napp = "flows.py:app"\n{extra}[store]\nurl = "{sqlite_url}"\n'
                      '[providers.outbox]\nplugin = "outbox"\npath = "var/outbox"\n')
    return config


@pytest.mark.usefixtures("restore_logging")
def test_check_names_each_bad_literal_argument_with_file_and_line(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = checked_app(tmp_path, sqlite_url, CHECKED)
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    flows = tmp_path / "flows.py"
    assert f"{flows}:11: rt.wait_until_local(): hour must be a whole number from 0 to 23" in out
    assert f"{flows}:12: rt.wait_until_local(): weekdays 'weekdays'" in out
    assert f"{flows}:13: rt.wait_until_local(): unknown time zone 'Europe/Atlantis'" in out
    assert f"{flows}:10:" not in out
    assert f"{flows}:14:" not in out
    assert "check: 3 problems" in out


@pytest.mark.usefixtures("restore_logging")
def test_check_names_a_malformed_send_window_and_an_unknown_default_zone(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    app = CHECKED.replace('@app.campaign("digest", segments=["everyone"])',
                          '@app.campaign("digest", segments=["everyone"], '
                          'send_window=("09:00", "18:00", "mon-fry"))')
    config = checked_app(tmp_path, sqlite_url, app)
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'flows.py'}:8: campaign 'digest': send_window: weekdays" in out
    config = checked_app(tmp_path, sqlite_url, FRIDAYS,
                         extra='default_timezone = "Europe/Pariss"\n')
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "daemon.default_timezone" in err
    assert "Europe/Pariss" in err
