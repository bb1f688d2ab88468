"""segflow-tui's pick-and-send screen (``b``, issue #21) driven by keys against a real
daemon (every service, in-process) whose data source is a real PostgreSQL customer
database: the broadcast it launches really runs, and a daemon's refusal is shown in the
screen with nothing sent."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from control_harness import short_tmp
from customer_db import AUDIENCE, DISCOVERY, PRELOAD, seed_postgres
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

from segflow_tui.app import SegflowTUI
from segflow_tui.backend import SocketBackend
from segflow_tui.pick import PickSendScreen
from segflow_tui.pickvalues import format_values, guess_values, parse_values
from segflowd.app import Segflow
from segflowd.config import Config, load_config
from segflowd.daemon import Daemon
from segflowd.schema import audience_members, broadcasts, messages
from segflowd.store import Store

pytestmark = pytest.mark.anyio

SIZE = (150, 45)
GARDENERS = 'communities:{"community_id":1}'


@pytest.fixture
def folder() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


def make_app(folder: Path) -> Segflow:
    (folder / "spring.html").write_text("<p>Spring, {{ user.email }}</p>")
    app = Segflow(templates=str(folder))
    app.data_source("communities", source="crm", discovery=DISCOVERY, audience=AUDIENCE,
                    preload=PRELOAD)
    app.template("spring-sale", subject="Spring", html="spring.html")
    return app


def make_config(folder: Path, store_url: str, postgres_url: str) -> Config:
    path = folder / "segflow.toml"
    path.write_text(f"""
[daemon]
app = "app.py:app"
control_socket = "ctl.sock"
[store]
url = "{store_url}"
[http]
listen = "127.0.0.1:18999"
[email]
provider = "outbox"
[providers.outbox]
plugin = "outbox"
path = "outbox"
[sources.crm]
url = "{postgres_url}"
""")
    config = load_config(path, environ={})
    return dataclasses.replace(config, http=dataclasses.replace(config.http,
                                                                listen="127.0.0.1:0"))


@contextlib.asynccontextmanager
async def full_daemon(folder: Path, sqlite_url: str, postgres_url: str
                      ) -> AsyncIterator[tuple[Config, Store]]:
    """The daemon with all its services (audiences, broadcasts, delivery to an outbox
    folder), and a store connection of the test's own to check what it wrote."""
    seed_postgres(postgres_url)
    store = Store.open(sqlite_url)
    await store.migrate()
    config = make_config(folder, sqlite_url, postgres_url)
    daemon = Daemon(config, make_app(folder))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(30):
                while not daemon.statistics().ready:  # noqa: ASYNC110 - no ready event
                    await anyio.sleep(0.01)
            try:
                yield config, store
            finally:
                daemon.request_stop()
    finally:
        await store.close()


def tui(config: Config) -> SegflowTUI:
    return SegflowTUI(SocketBackend(config.daemon.control_socket), poll_interval=0.2,
                      feed_interval=0.05, retry_interval=0.1)


async def until(pilot: Pilot[None], cond: Callable[[], bool], within: float = 30) -> None:
    with anyio.fail_after(within):
        while not cond():
            await pilot.pause(0.05)


def text(screen: PickSendScreen, selector: str) -> str:
    return str(screen.query_one(selector, Static).content)


async def open_pick(app: SegflowTUI, pilot: Pilot[None]) -> PickSendScreen:
    """``b``, then the one data source: its discovery rows are listed."""
    await until(pilot, lambda: app.refreshes >= 1)
    await pilot.press("b")
    screen = app.screen
    assert isinstance(screen, PickSendScreen)
    sources = screen.query_one("#pick-sources", DataTable)
    await until(pilot, lambda: sources.row_count == 1)
    assert "communities" in str(sources.get_row_at(0))
    assert "community_id" in str(sources.get_row_at(0))  # the placeholders shown
    await pilot.press("enter")
    await until(pilot, lambda: screen.step == "rows")
    table = screen.query_one("#pick-rows", DataTable)
    await until(pilot, lambda: table.row_count == 2)  # the active communities
    assert [str(c.label) for c in table.columns.values()] == [
        "id", "community_name", "user_count", "plan_type"]
    assert table.get_row_at(0)[:2] == ["1", "Gardeners"]
    return screen


async def pick_gardeners(screen: PickSendScreen, pilot: Pilot[None]) -> None:
    await pilot.press("enter")  # the first row: Gardeners (community 1)
    await until(pilot, lambda: screen.step == "audience" and bool(screen.preview))
    assert screen.query_one("#pick-values", Input).value == "community_id=1"
    assert screen.values == {"community_id": 1}  # the row's integer id, typed
    count = text(screen, "#pick-count")
    assert "audience: 2 profiles" in count
    assert GARDENERS in count
    sample = screen.query_one("#pick-sample", DataTable)
    assert sample.row_count == 2
    assert [sample.get_row_at(i)[0] for i in (0, 1)] == ["u-ada", "u-bob"]


async def test_pick_a_row_and_send_a_template_to_its_audience(
        sqlite_url: str, postgres_url: str, folder: Path) -> None:
    async with full_daemon(folder, sqlite_url, postgres_url) as (config, store):
        app = tui(config)
        async with app.run_test(size=SIZE) as pilot:
            screen = await open_pick(app, pilot)
            await pick_gardeners(screen, pilot)
            async with store.connect() as conn:  # the dry run wrote nothing
                assert (await conn.execute(sa.select(sa.func.count()).select_from(
                    audience_members))).scalar_one() == 0
            await pilot.press(*"spring-sale", "tab", "tab", *"100", "enter")
            assert screen.step == "confirm"
            question = text(screen, "#pick-confirm")
            assert "Send template spring-sale to 2 profiles of data source communities" \
                in question
            assert '{"community_id": 1}' in question
            assert "at 100 users/s" in question
            await pilot.press("y")
            await until(pilot, lambda: screen.step == "progress" and screen.done)
            progress = text(screen, "#pick-progress")
            bid = screen.launched["id"]
            assert isinstance(bid, int)
            assert f"broadcast {bid}: template spring-sale to {GARDENERS}" in progress
            assert "users handled: 2 of 2  (completed)" in progress
            assert "2 sent · 0 queued · 0 failed · 0 suppressed" in progress
            assert "done." in progress
            shown = dict(screen.counts)
            await pilot.press("escape")  # closes; the app is back
            assert not isinstance(app.screen, PickSendScreen)
        m = messages.c
        async with store.connect() as conn:
            sent = sorted(tuple(r) for r in await conn.execute(
                sa.select(m.user_id, m.to_address, m.status, m.template)
                .where(m.dedupe_key.like(f"bc:{bid}:%"))))
            row = (await conn.execute(sa.select(broadcasts).where(
                broadcasts.c.id == bid))).one()
    assert sent == [("u-ada", "ada@example.com", "sent", "spring-sale"),
                    ("u-bob", "bob@example.com", "sent", "spring-sale")]
    assert shown == {"sent": len(sent), "queued": 0, "failed": 0, "suppressed": 0}
    assert (row.segment, row.total, row.done, row.status, row.rate) == (
        GARDENERS, 2, 2, "completed", 100.0)
    assert len(list((folder / "outbox").glob("*.eml"))) == 2  # really delivered


async def test_a_daemon_refusal_is_shown_in_the_screen_and_nothing_is_sent(
        sqlite_url: str, postgres_url: str, folder: Path) -> None:
    async with full_daemon(folder, sqlite_url, postgres_url) as (config, store):
        app = tui(config)
        async with app.run_test(size=SIZE) as pilot:
            screen = await open_pick(app, pilot)
            await pick_gardeners(screen, pilot)
            await pilot.press(*"nope", "enter")
            assert screen.step == "confirm"
            await pilot.press("y")
            await until(pilot, lambda: bool(screen.error))
            assert screen.step == "audience"  # back where the template is fixed
            error = text(screen, "#pick-error")
            assert "unknown template 'nope' (templates: spring-sale)" in error
            assert "Traceback" not in error
            # A placeholder the audience query lacks: the daemon's message, no count.
            values = screen.query_one("#pick-values", Input)
            values.value = "communty=1"
            values.focus()
            await pilot.press("enter")
            await until(pilot, lambda: "has no placeholder 'communty'" in screen.error)
            assert "no audience" in text(screen, "#pick-count")
            await pilot.press("escape", "escape")  # back to the rows, then the sources
            assert screen.step == "sources"
            await pilot.press("escape")
            assert not isinstance(app.screen, PickSendScreen)
        async with store.connect() as conn:
            counts = [(await conn.execute(sa.select(sa.func.count()).select_from(t)))
                      .scalar_one() for t in (broadcasts, messages, audience_members)]
    assert counts == [0, 0, 0]


def test_a_rows_values_are_guessed_and_read_back_with_their_types() -> None:
    row = {"id": 7, "community_name": "Chess", "plan": "pro"}
    assert guess_values(row, ["community_id"]) == {"community_id": 7}
    assert guess_values(row, ["plan", "community_id"]) == {"plan": "pro", "community_id": 7}
    assert guess_values(row, ["region", "plan"]) == {"plan": "pro"}  # region: typed
    assert guess_values({"name": "x"}, ["slug"]) == {"slug": "x"}
    values = {"community_id": 7, "code": "42", "name": "two words", "flag": None}
    text_form = format_values(values)
    assert parse_values(text_form) == values  # "42" stays text, 7 an integer
