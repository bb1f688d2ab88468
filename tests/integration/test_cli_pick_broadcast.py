"""``segflowd broadcast --data-source ... --values ...`` against a running daemon's control
socket, served by the real audience and broadcast services on a PostgreSQL customer
database: the dry run's output, a launch, and bad input as one clear line and an exit
status, never a traceback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from control_harness import make_config, running_daemon, short_tmp
from customer_db import AUDIENCE, DISCOVERY, PRELOAD, seed_postgres

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.cli.commands import main
from segflowd.config import load_config
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import audience_members, broadcasts
from segflowd.sources.audiences import AudienceService
from segflowd.sources.broadcasts import BroadcastService
from segflowd.sources.datasources import DataSources
from segflowd.sources.pools import SourceService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

GARDENERS = 'communities:{"community_id":1}'


def make_app() -> Segflow:
    app = Segflow(templates="templates")
    app.data_source("communities", source="crm", discovery=DISCOVERY, audience=AUDIENCE,
                    preload=PRELOAD)
    app.template("spring-sale", subject="Spring", html="spring.html")
    return app


@pytest.fixture
async def services(postgres_url: str, tmp_path: Path) -> AsyncIterator[Kernel]:
    """A kernel with the real audience and broadcast services (its actions are served
    by the test daemon's control socket)."""
    seed_postgres(postgres_url)
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                    '[providers.outbox]\nplugin = "outbox"\n'
                    f'[sources.crm]\nurl = "{postgres_url}"\n')
    store = Store.open(f"sqlite+aiosqlite:///{tmp_path}/picks.db")
    await store.migrate()
    k = Kernel(config=load_config(path, environ={}), app=make_app(), store=store,
               clock=FakeClock(), bus=Bus(), metrics=Metrics())
    sources = SourceService(k)
    AudienceService(k, DataSources(sources, k.app.data_sources, k.app.audiences))
    BroadcastService(k)
    try:
        yield k
    finally:
        await sources.drain()
        await store.close()


async def cli(*argv: str) -> int:
    return await anyio.to_thread.run_sync(main, list(argv))


async def test_broadcast_to_a_data_source_from_the_command_line(
        services: Kernel, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    k = services
    pick = ("--data-source", "communities", "--values", "community_id=1")
    with short_tmp() as folder:
        config = make_config(folder, sqlite_url)
        sock = ("--socket", str(config.daemon.control_socket))
        actions = {n: k.actions[n] for n in ("broadcast.launch", "audiences.pick")}
        async with running_daemon(config, actions=actions):
            capsys.readouterr()
            dry = await cli("broadcast", *pick, "--template", "spring-sale", "--dry-run",
                            *sock)
            dry_out = capsys.readouterr().out
            errors = []
            for argv in [
                ("--data-source", "nope", "--values", "community_id=1"),
                ("--data-source", "communities", "--values", "communty=1"),
                ("--data-source", "communities", "--values", "community_id"),
                ("--data-source", "communities", "--values", "community_id=[1,"),
                ("cyclists",),
                ("cyclists", *pick),
                (),
            ]:
                code = await cli("broadcast", *argv, "--template", "spring-sale", *sock)
                errors.append((code, capsys.readouterr().err))
            launched = await cli("broadcast", *pick, "--template", "spring-sale", "--json",
                                 *sock)
            out = capsys.readouterr().out.splitlines()  # the reply, among log lines
            reply = json.loads("\n".join(out[out.index("{"):out.index("}") + 1]))
    assert dry == 0
    assert "audience: 2 profiles (nothing was written or sent)" in dry_out
    assert f"segment: {GARDENERS}" in dry_out
    assert "u-ada" in dry_out
    assert "bob@example.com" in dry_out
    assert [c for c, _ in errors] == [1, 1, 2, 2, 1, 2, 2]
    messages = [e for _, e in errors]
    assert "no data source 'nope'" in messages[0]
    assert "has no placeholder 'communty'" in messages[1]
    assert "--values wants KEY=VALUE, got 'community_id'" in messages[2]
    assert "looks like a JSON array or object" in messages[3]
    assert "unknown segment 'cyclists'" in messages[4]
    assert "not both" in messages[5]
    assert "give a segment, or --data-source" in messages[6]
    assert not any("Traceback" in e for e in messages)
    assert all(e.startswith("segflowd: ") and e.count("\n") == 1 for e in messages)
    assert launched == 0
    assert (reply["segment"], reply["total"], reply["template"]) == (
        GARDENERS, 2, "spring-sale")
    async with k.store.connect() as conn:
        members = sorted(r[0] for r in await conn.execute(
            sa.select(audience_members.c.user_id)))
        segments = [r[0] for r in await conn.execute(sa.select(broadcasts.c.segment))]
    assert members == ["u-ada", "u-bob"]  # synced by the launch, not by the dry run
    assert segments == [GARDENERS]
