"""``segflowd status`` prints the dashboard's health (the control ``status`` reply's
``health``) and the warnings segflow-tui shows, at the daemon's ``[dashboard]``
thresholds, against a running daemon."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from control_harness import make_config, running_daemon, seed, short_tmp

from segflowd import schema
from segflowd.cli.commands import main
from segflowd.cli.control import format_status
from segflowd.clock import utcnow
from segflowd.dashboard import DashboardConfig
from segflowd.store import Store

pytestmark = pytest.mark.anyio

BOUNCE = "550 5.1.1 mailbox unavailable"


@pytest.fixture
def folder() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


async def cli(*argv: str) -> int:
    return await anyio.to_thread.run_sync(main, list(argv))


async def status_text(sqlite_url: str, folder: Path, capsys: pytest.CaptureFixture[str],
                      dashboard: DashboardConfig) -> str:
    config = dataclasses.replace(make_config(folder, sqlite_url), dashboard=dashboard)
    async with running_daemon(config):
        capsys.readouterr()  # the daemon's start-up log lines
        assert await cli("status", "--socket", str(config.daemon.control_socket)) == 0
        return capsys.readouterr().out


async def test_status_prints_health_and_the_dashboards_warnings(
        sqlite_url: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store.open(sqlite_url)
    await store.migrate()
    await seed(store)  # one failed instance; its failures are months old
    now = utcnow()
    async with store.begin() as conn:
        await conn.execute(sa.insert(schema.messages), [
            {"id": 20 + i, "user_id": "u3", "kind": "campaign", "campaign": "welcome",
             "template": "welcome_1", "status": "failed", "attempts": 5,
             "last_error": BOUNCE, "created_at": now - dt.timedelta(minutes=i),
             "updated_at": now - dt.timedelta(minutes=i)} for i in range(3)])
    await store.close()
    text = await status_text(sqlite_url, folder, capsys,
                             DashboardConfig(failures_per_hour=3, campaign_failures_per_hour=5))
    lines = text.splitlines()
    health = next(line for line in lines if line.startswith("health: "))
    assert health.startswith("health: 3 failures in the last hour, oldest queued message ")
    assert health.endswith("instances 1 failed, 0 diverged")
    assert f"  3x (message) {BOUNCE}" in lines
    warnings = [line for line in lines if line.startswith("WARNING: ")]
    assert warnings == [
        "WARNING: 3 failures in the last hour (warns at 3)",
        "WARNING: 1 instances failed or diverged: restart or terminate them",
        # seed's message queued since 2026-03-01: far past the default 600 s
        warnings[2],
    ]
    assert warnings[2].startswith("WARNING: the oldest queued message has waited ")
    assert lines.index(warnings[0]) == 1  # right under the version line, seen first
    assert not any("campaign welcome" in w for w in warnings)  # 3 < 5


async def test_a_quiet_daemon_has_a_health_line_and_no_warning(
        sqlite_url: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = await status_text(sqlite_url, folder, capsys, DashboardConfig())
    assert ("health: 0 failures in the last hour, oldest queued message -, "
            "instances 0 failed, 0 diverged") in text.splitlines()
    assert "WARNING" not in text


def test_health_unknown_when_the_store_did_not_answer() -> None:
    text = format_status({"version": "0.1.0", "health": None})
    assert "health: unknown (the store did not answer)" in text.splitlines()
    assert "health" not in format_status({"version": "0.1.0"})  # an older daemon
