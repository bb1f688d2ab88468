"""Campaign reports against hand-counted fixtures, on SQLite and MariaDB: the query, the
variants' test, the ``report`` control action, ``segflowd report`` and the TUI screen."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from statistics import NormalDist

import anyio
import pytest
import sqlalchemy as sa
from control_harness import make_config, running_daemon, short_tmp
from delivery_harness import make_kernel
from textual.widgets import Static

from segflow_tui.app import SegflowTUI
from segflow_tui.backend import SocketBackend
from segflow_tui.reports import ReportsScreen
from segflowd.cli.commands import main
from segflowd.control.client import ControlClient
from segflowd.delivery.msgevents import record_message_event
from segflowd.errors import ControlReplyError
from segflowd.reports import compare_variants, report, two_proportion_p
from segflowd.schema import conversions, engagement, messages, schema_version
from segflowd.store import Store

pytestmark = pytest.mark.anyio

D0 = dt.datetime(2026, 3, 1, 9, 0)
D1 = D0 + dt.timedelta(days=1)
# id, campaign, step, template, variant, status, queued at
MESSAGES = [
    (1, "welcome", 1, "w1", "control", "sent", D0),
    (2, "welcome", 1, "w1", "control", "sent", D0),
    (3, "welcome", 1, "w1", "control", "failed", D0),
    (4, "welcome", 1, "w1", "b", "sent", D0),
    (5, "welcome", 1, "w1", "b", "sent", D0),
    (6, "welcome", 1, "w1", "b", "queued", D0),
    (7, "welcome", 2, "w2", "control", "sent", D1),
    (8, "welcome", 2, "w2", "b", "sent", D1),
    (9, "welcome", 2, "w2", "b", "suppressed", D1),
    (10, "welcome", 1, "w1", "control", "sent", D1),
    (11, "other", 1, "o1", None, "sent", D0),
    (12, None, None, "receipt", None, "sent", D0),  # a transactional message: not reported
]
# message, kind, url, machine, hits
ENGAGEMENT = [
    (1, "open", None, False, 3),  # opened three times: one unique open
    (1, "click", "https://example.org/a", False, 1),
    (1, "click", "https://example.org/b", False, 2),  # two links: one unique click
    (2, "open", None, True, 1),  # a prefetcher's open only: not opened
    (4, "open", None, True, 1),
    (4, "open", None, False, 1),  # a person's too: opened once
    (5, "open", None, False, 1),
    (5, "click", "https://example.org/a", False, 1),
    (7, "open", None, False, 1),
    (8, "click", "https://example.org/a", True, 1),  # a scanner's click: not clicked
    (12, "open", None, False, 1),
]
EVENTS = [(1, "delivered"), (2, "delivered"), (4, "delivered"), (5, "bounced"),
          (2, "complained"), (7, "delivered"), (4, "unsubscribed"), (4, "unsubscribed")]
CONVERTED = [1, 5, 8, 11]
ZERO = dict.fromkeys(("queued", "sent", "failed", "suppressed", "delivered", "bounced",
                      "complained", "opened_unique", "clicked_unique", "unsubscribed",
                      "converted"), 0)


def counts(**given: int) -> dict[str, int]:
    return {**ZERO, **given}


# Counted by hand from the fixtures above.
EXPECTED = {
    ("other", 1, "o1", None, "2026-03-01"): counts(queued=1, sent=1, converted=1),
    ("welcome", 1, "w1", "control", "2026-03-01"): counts(
        queued=3, sent=2, failed=1, delivered=2, complained=1, opened_unique=1,
        clicked_unique=1, converted=1),
    ("welcome", 1, "w1", "control", "2026-03-02"): counts(queued=1, sent=1),
    ("welcome", 1, "w1", "b", "2026-03-01"): counts(
        queued=3, sent=2, delivered=1, bounced=1, opened_unique=2, clicked_unique=1,
        unsubscribed=1, converted=1),
    ("welcome", 2, "w2", "control", "2026-03-02"): counts(
        queued=1, sent=1, delivered=1, opened_unique=1),
    ("welcome", 2, "w2", "b", "2026-03-02"): counts(
        queued=2, sent=1, suppressed=1, converted=1),
}


async def fill(store: Store, tmp_path: Path) -> None:
    async with store.begin() as conn:
        await conn.execute(sa.insert(messages), [
            {"id": i, "user_id": f"u{i}", "kind": "campaign" if c else "transaction",
             "campaign": c, "step": s, "template": t, "variant": v, "status": st,
             "created_at": at, "updated_at": at} for i, c, s, t, v, st, at in MESSAGES])
        await conn.execute(sa.insert(engagement), [
            {"message_id": m, "user_id": f"u{m}", "kind": k, "url": u, "machine": mach,
             "hits": h, "created_at": D1} for m, k, u, mach, h in ENGAGEMENT])
        await conn.execute(sa.insert(conversions), [
            {"campaign": MESSAGES[m - 1][1], "message_id": m, "user_id": f"u{m}",
             "template": MESSAGES[m - 1][3], "variant": MESSAGES[m - 1][4], "event_id": m,
             "event_name": "purchase", "converted_at": D1} for m in CONVERTED])
    k = make_kernel(store, tmp_path).kernel
    for mid, kind in EVENTS:  # the unsubscribe twice: counted once
        await record_message_event(k, mid, kind)
    assert not await record_message_event(k, 999, "delivered")  # not one of ours


def by_key(rows: list[dict[str, object]]) -> dict[tuple[object, ...], dict[str, object]]:
    return {(r["campaign"], r["step"], r["template"], r["variant"], r["day"]):
            {k: r[k] for k in ZERO} for r in rows}


async def test_counts_per_step_template_variant_and_day_match_the_hand_count(
        store: Store, tmp_path: Path) -> None:
    await fill(store, tmp_path)
    found = await report(store)
    assert by_key([r.as_json() for r in found.rows]) == EXPECTED
    first = next(r for r in found.rows if (r.campaign, r.variant, r.day) == (
        "welcome", "b", dt.date(2026, 3, 1)))
    assert first.rates["opened_unique"] == 1.0  # over sent: 2 of 2
    assert first.rates["bounced"] == 0.5
    assert first.rates["converted"] == 0.5
    again = await report(store)  # the opens are copied once: the same numbers
    assert by_key([r.as_json() for r in again.rows]) == EXPECTED


async def test_filters_by_campaign_and_since(store: Store, tmp_path: Path) -> None:
    await fill(store, tmp_path)
    other = await report(store, campaign="other")
    assert [(r.campaign, r.counts["converted"]) for r in other.rows] == [("other", 1)]
    later = await report(store, campaign="welcome", since=dt.date(2026, 3, 2))
    assert by_key([r.as_json() for r in later.rows]) == {
        k: v for k, v in EXPECTED.items() if k[4] == "2026-03-02"}
    assert (await report(store, campaign="nobody")).rows == ()


async def test_opens_and_clicks_stored_after_a_report_count_in_the_next(
        store: Store, tmp_path: Path) -> None:
    await fill(store, tmp_path)
    await report(store)
    async with store.begin() as conn:
        await conn.execute(sa.insert(engagement).values(
            message_id=10, user_id="u10", kind="open", machine=False, hits=1, created_at=D1))
    found = await report(store, campaign="welcome", since=D1)
    row = next(r for r in found.rows if r.step == 1)
    assert row.counts["opened_unique"] == 1


async def test_variants_conversion_rates_and_p_value_against_the_control(
        store: Store, tmp_path: Path) -> None:
    await fill(store, tmp_path)
    variants = {(v.campaign, v.variant): v for v in (await report(store)).variants}
    control, b = variants[("welcome", "control")], variants[("welcome", "b")]
    assert (control.sent, control.converted, control.control) == (4, 1, True)
    assert (b.sent, b.converted, b.control) == (3, 2, False)
    assert control.conversion_rate == 0.25
    # by hand: pooled 3/7, z = (2/3 - 1/4) / sqrt(3/7 * 4/7 * (1/3 + 1/4)) = 5 sqrt(7) / 12
    z = 5 * math.sqrt(7) / 12
    assert b.p_value == pytest.approx(2 * (1 - NormalDist().cdf(z)), abs=1e-6)
    assert b.p_value == pytest.approx(0.270289, abs=1e-6)
    assert control.p_value is None
    assert not b.winner  # 3 messages prove nothing
    other = variants[("other", None)]
    assert (other.control, other.p_value, other.winner) == (False, None, False)


def test_two_proportion_test_and_the_winner() -> None:
    # 45/100 against 30/100: pooled 0.375, z = 0.15 / sqrt(0.375 * 0.625 * 0.02) = 2.19089
    assert two_proportion_p(45, 100, 30, 100) == pytest.approx(0.0284597, abs=1e-6)
    assert two_proportion_p(0, 10, 0, 10) is None  # nothing converted: nothing to test
    assert two_proportion_p(1, 0, 1, 10) is None
    rows = compare_variants([("c", "control", 100, 100, 30), ("c", "b", 100, 100, 45),
                             ("c", "a", 100, 100, 31)])
    assert [(r.variant, r.control, r.winner) for r in rows] == [
        ("a", False, False), ("b", False, True), ("control", True, False)]


@pytest.fixture
def folder() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


async def test_the_report_control_action_and_its_bad_arguments(
        sqlite_url: str, folder: Path, tmp_path: Path) -> None:
    store = Store.open(sqlite_url)
    await store.migrate()
    await fill(store, tmp_path)
    await store.close()
    config = make_config(folder, sqlite_url)
    async with running_daemon(config), \
            await ControlClient.connect(config.daemon.control_socket) as c:
        answer = await c.action("report", {"campaign": "welcome", "since": "2026-03-02"})
        assert isinstance(answer, dict)
        assert by_key(answer["rows"]) == {k: v for k, v in EXPECTED.items()
                                          if k[0] == "welcome" and k[4] == "2026-03-02"}
        assert answer["since"] == "2026-03-02T00:00:00"
        for bad in ({"since": "yesterday"}, {"campaign": 3}, {"limit": 1}):
            with pytest.raises(ControlReplyError) as err:
                await c.action("report", bad)
            assert err.value.code == "action_failed"


async def cli(*argv: str) -> int:
    return await anyio.to_thread.run_sync(main, list(argv))


async def test_segflowd_report_prints_a_table_json_and_csv(
        store: Store, store_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    await fill(store, tmp_path)
    config = tmp_path / "segflow.toml"
    config.write_text(f'[daemon]\napp = "app.py:app"\n[store]\nurl = "{store_url}"\n',
                      encoding="utf-8")
    capsys.readouterr()
    assert await cli("report", "--config", str(config), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert by_key(data["rows"]) == EXPECTED
    assert [v["variant"] for v in data["variants"]] == [None, "b", "control"]
    assert await cli("report", "--config", str(config), "--csv", "--campaign", "other") == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["campaign"], r["step"], r["variant"], r["sent"], r["converted_rate"])
            for r in table] == [("other", "1", "", "1", "1.0")]
    assert await cli("report", "--config", str(config)) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:6] == ["campaign", "step", "template", "variant",
                                               "day", "queued"]
    assert "welcome   2     w2        b        2026-03-02  2" in text
    assert await cli("report", "--config", str(config), "--since", "March") == 2
    assert "'since' is not an ISO date" in capsys.readouterr().err
    async with store.begin() as conn:  # a store not migrated yet has no reports
        await conn.execute(sa.update(schema_version).values(version=10))
    assert await cli("report", "--config", str(config)) == 1
    assert "schema version 10 has no reports yet; run segflowd migrate" in \
        capsys.readouterr().err


async def test_the_tui_reports_screen_shows_bars_per_step_and_variant(
        sqlite_url: str, folder: Path, tmp_path: Path) -> None:
    store = Store.open(sqlite_url)
    await store.migrate()
    await fill(store, tmp_path)
    await store.close()
    config = make_config(folder, sqlite_url)
    async with running_daemon(config):
        app = SegflowTUI(SocketBackend(config.daemon.control_socket), poll_interval=0.2,
                         feed_interval=0.05, retry_interval=0.1)
        async with app.run_test(size=(150, 45)) as pilot:
            with anyio.fail_after(15):
                while app.refreshes < 1:
                    await pilot.pause(0.05)
            await pilot.press("r")
            with anyio.fail_after(15):
                while "welcome" not in str(app.screen.query_one("#reports", Static).content):
                    await pilot.pause(0.05)
            assert isinstance(app.screen, ReportsScreen)
            text = str(app.screen.query_one("#reports", Static).content)
            lines = text.splitlines()
            step1 = next(line for line in lines if line.strip().startswith("1 w1"))
            step2 = next(line for line in lines if line.strip().startswith("2 w2"))
            assert step1.count("█") == 30  # the step that sent most: the longest bar
            assert step2.count("█") == 12  # 2 sent against 5
            b = next(line for line in lines if line.strip().startswith("b "))
            assert "66.7%  2/3  p=0.2703" in b
            assert "control" in next(line for line in lines
                                     if line.strip().startswith("control "))
            await pilot.press("escape")
            assert not isinstance(app.screen, ReportsScreen)
