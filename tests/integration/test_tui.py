"""segflow-tui driven headless (Textual's Pilot) against a daemon running in-process."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from control_harness import T0, make_config, running_daemon, seed, short_tmp
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, RichLog, Select, Static

from segflow_tui.app import FEED_LINES, SegflowTUI, main
from segflow_tui.backend import SocketBackend
from segflow_tui.render import FeedFilter
from segflow_tui.screens import (
    ActionScreen,
    ConfirmScreen,
    DetailScreen,
    FunnelScreen,
    HelpScreen,
)
from segflowd import schema
from segflowd.clock import utcnow
from segflowd.config import Config
from segflowd.control import queries
from segflowd.dashboard import DashboardConfig
from segflowd.store import Store

pytestmark = pytest.mark.anyio

SIZE = (150, 45)


@pytest.fixture
def folder() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


def tui(config: Config) -> SegflowTUI:
    return SegflowTUI(SocketBackend(config.daemon.control_socket), poll_interval=0.2,
                      feed_interval=0.05, retry_interval=0.1)


async def until(pilot: Pilot[None], cond: Callable[[], bool], within: float = 15) -> None:
    with anyio.fail_after(within):
        while not cond():
            await pilot.pause(0.05)


def text(app: SegflowTUI, selector: str) -> str:
    return str(app.query_one(selector, Static).content)


def rows(app: SegflowTUI, selector: str) -> int:
    return app.query_one(selector, DataTable).row_count


LONG = "421 4.4.2 the receiving server closed the connection " + "x" * 300 + " END"


async def seed_more(store: Store, now: dt.datetime) -> None:
    """On top of seed(): u2's segment entries and exits, an open, a failure just now."""
    async with store.begin() as conn:
        await conn.execute(sa.insert(schema.segment_changes), [
            {"segment": "vip", "user_id": "u2", "entered": True, "at": T0},
            {"segment": "vip", "user_id": "u2", "entered": False,
             "at": T0 + dt.timedelta(minutes=30)},
        ])
        await conn.execute(sa.insert(schema.engagement).values(
            message_id=1, user_id="u1", kind="click", url="https://example.com/go",
            created_at=T0 + dt.timedelta(minutes=5), hits=1, machine=False))
        await conn.execute(sa.insert(schema.messages).values(
            id=9, user_id="u3", kind="campaign", campaign="welcome", template="welcome_1",
            status="failed", attempts=5, last_error=LONG, created_at=now, updated_at=now))


async def test_health_and_journey_queries_on_each_store(store: Store) -> None:
    now = utcnow()
    await seed(store)
    await seed_more(store, now)
    health = await queries.health(store, now)
    assert health is not None
    assert health["failures_1h"] == 1  # seed's failures are months old
    assert health["top_errors"] == [{"error": LONG, "where": "message", "count": 1}]
    assert health["instances"] == {"failed": 1, "diverged": 0}
    assert health["campaigns"] == {"welcome": {"entries_1h": 0, "failures_1h": 1}}
    oldest = health["oldest_queued_s"]  # message 3, queued since T0 + 2 min
    assert isinstance(oldest, float)
    assert oldest == pytest.approx((now - T0 - dt.timedelta(minutes=2)).total_seconds())
    u2 = await queries.user_detail(store, "u2")
    assert u2 is not None
    assert u2["segment_changes"] == [
        {"segment": "vip", "entered": False, "at": T0 + dt.timedelta(minutes=30)},
        {"segment": "vip", "entered": True, "at": T0}]
    u1 = await queries.user_detail(store, "u1")
    assert u1 is not None
    assert [(e["kind"], e["url"]) for e in u1["engagement"]] == [
        ("click", "https://example.com/go")]


async def test_screens_show_the_daemons_data_and_keys_navigate_them(
        sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url)
    config = dataclasses.replace(config, dashboard=DashboardConfig(failures_per_hour=1))
    store = Store.open(sqlite_url)
    await store.migrate()
    await seed(store)
    await seed_more(store, utcnow())
    await store.close()
    async with running_daemon(config) as d:
        app = tui(config)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.refreshes >= 1)
            assert "connected to segflowd 0.1.0" in text(app, "#conn")
            assert "sqlite, healthy" in text(app, "#body-store")
            panels = {p.key: p for p in app.panels}
            assert panels["failures"].warnings == ("1 failures ≥ 1",)  # [dashboard] applies
            assert app.query_one("#panel-failures").has_class("warn")
            assert panels["store"].warnings == ()
            assert "1 failed, 0 diverged" in text(app, "#body-instances")
            await pilot.press("e")  # the error the panel cuts, in full
            assert isinstance(app.screen, DetailScreen)
            assert LONG in str(app.screen.query_one("#detail", Static).content)
            await pilot.press("escape")
            await pilot.press("2")
            assert app.query_one("#tabs").active == "campaigns"  # type: ignore[attr-defined]
            assert rows(app, "#campaigns-table") == 2
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, FunnelScreen))
            assert app.screen.query_one("#funnel", DataTable).row_count == 3
            await pilot.press("escape")
            await pilot.press("4")
            assert rows(app, "#segments-table") == 2
            await pilot.press("5")
            app.query_one("#user-id").focus()
            await pilot.press(*"u2", "enter")
            await until(pilot, lambda: "welcome_1" in text(app, "#timeline"))
            assert "550 mailbox unavailable" in text(app, "#timeline")
            assert "segment left          vip" in text(app, "#timeline")
            assert "segment entered       vip" in text(app, "#timeline")
            await pilot.press("6")  # enter left the field: digits switch screens again
            assert rows(app, "#messages-table") == 4
            await pilot.press("x")
            await until(pilot, lambda: rows(app, "#messages-table") == 2)
            await pilot.press("enter")  # the newest failure, its error in full
            assert isinstance(app.screen, DetailScreen)
            assert LONG in str(app.screen.query_one("#detail", Static).content)
            await pilot.press("escape")
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            await pilot.press("3")
            d.kernel.bus.publish("flow.entered", user_id="u1", campaign="welcome")
            d.kernel.bus.publish("flow.entered", user_id="u2", campaign="welcome")
            feed = app.query_one("#feed", RichLog)
            await until(pilot, lambda: len(feed.lines) >= 2)
            await pilot.press("slash", *"user:u2", "escape", "4")
            assert app.query_one("#tabs").active == "segments"  # type: ignore[attr-defined]
            await pilot.press("3")
            await until(pilot, lambda: len(feed.lines) == 1)
            assert "user_id=u2" in feed.lines[0].text


async def test_an_admin_action_runs_only_after_confirmation(sqlite_url: str, folder: Path) -> None:
    calls: list[Mapping[str, object]] = []

    async def pause(args: Mapping[str, object]) -> object:
        calls.append(dict(args))
        return None

    async def restart(args: Mapping[str, object]) -> object:
        calls.append(dict(args))
        return {"restarted": args["instance"]}

    config = make_config(folder, sqlite_url)
    actions = {"campaign.pause": pause, "instance.restart": restart}
    async with running_daemon(config, actions=actions):
        app = tui(config)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.refreshes >= 1)
            await pilot.press("2", "p")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
            await until(pilot, lambda: app.last_action == ("campaign.pause", "cancelled"))
            await pilot.press("p")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: app.last_action == ("campaign.pause", "ok"))
            await pilot.press("u", "y")  # resume: no service registered it
            await until(pilot, lambda: app.last_action is not None
                        and app.last_action[0] == "campaign.resume")
            resumed = app.last_action
            await pilot.press("a")  # any action the daemon offers, with typed arguments
            assert isinstance(app.screen, ActionScreen)
            app.screen.query_one("#action-name", Select).value = "instance.restart"
            app.screen.query_one("#action-args", Input).focus()
            await pilot.press(*"instance=7", "enter")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: app.last_action == ("instance.restart", "ok"))
    assert calls == [{"campaign": "welcome"}, {"instance": 7}]
    assert resumed == ("campaign.resume", "campaign.resume is not available in this daemon")


@pytest.fixture
async def loop_errors_named() -> AsyncIterator[None]:
    """Print what the event loop reports (the callback, not just its exception) before
    anyio fails the test with it: one CI run saw an InvalidStateError from a callback
    here that 60 runs alone never showed, and its traceback did not name the callback."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def report(lp: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        print(f"event loop: {context.get('message')!r} handle={context.get('handle')!r} "
              f"future={context.get('future')!r}", file=sys.stderr)
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(report)
    yield
    loop.set_exception_handler(previous)


async def test_tui_says_the_daemon_restarted_and_reconnects_by_itself(
        sqlite_url: str, folder: Path, loop_errors_named: None) -> None:
    config = make_config(folder, sqlite_url)
    app = tui(config)
    async with app.run_test(size=SIZE) as pilot:
        async with running_daemon(config):
            await until(pilot, lambda: app.connected)
        await until(pilot, lambda: not app.connected)
        assert "lost the daemon" in text(app, "#conn")
        async with running_daemon(config):
            await until(pilot, lambda: app.reconnects == 1 and app.connected)
            assert "(the daemon restarted)" in text(app, "#conn")
            seen = app.refreshes
            await until(pilot, lambda: app.refreshes > seen)


async def test_stays_responsive_while_the_daemon_streams_1000_events_per_second(
        sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url)
    typed = "kind:event user:u17-1"
    async with running_daemon(config) as d:
        app = tui(config)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.refreshes >= 1)
            await pilot.press("3", "slash")
            for burst in range(25):  # 2,500 events over ~2.5 s, typing all along
                for i in range(100):
                    d.kernel.bus.publish("event.ingested", user_id=f"u{burst}-{i}", name="x")
                if burst < len(typed):
                    await pilot.press(typed[burst] if typed[burst] != " " else "space")
                await anyio.sleep(0.1)
            await until(pilot, lambda: app.events_seen + app.missed_total >= 2500)
            await pilot.pause(0.2)
            feed = app.query_one("#feed", RichLog)
            assert app.query_one("#feed-filter", Input).value == typed
            assert app.feed_filter == FeedFilter(kind="event", user="u17-1")
            assert [line.text.split()[2] for line in feed.lines] == ["user_id=u17-1"]
            assert len(app._recent) == FEED_LINES  # bounded, however much was streamed


def test_missing_socket_at_start_is_one_sentence(folder: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--socket", str(folder / "none.sock")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("segflow-tui: no control socket at ")
    assert err.count("\n") == 1
