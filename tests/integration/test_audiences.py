"""Audiences synced from a real PostgreSQL customer database into the store (SQLite and
MariaDB): users upserted, membership kept exact, entries/exits through the segment engine,
preload as template `profile`, conditions; injection payloads stay plain data."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from customer_db import AUDIENCE, DISCOVERY, INJECTION, PRELOAD, PREMIUM, seed_postgres

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.errors import SourceError
from segflowd.hooks import IngestBatch, MembershipChange
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import audience_members, users
from segflowd.segments.engine import SegmentService
from segflowd.sources.audiences import AudienceService
from segflowd.sources.datasources import DataSources, PreloadContext
from segflowd.sources.pools import SourceService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio


def make_app() -> Segflow:
    app = Segflow(templates="templates")
    app.data_source("communities", source="crm", discovery=DISCOVERY, audience=AUDIENCE,
                    preload=PRELOAD)
    app.audience_segment("gardeners", data_source="communities", values={"community_id": 1})
    app.audience_segment("cyclists", data_source="communities", values={"community_id": "2"})
    return app


class Sink:
    def __init__(self) -> None:
        self.users: set[str] = set()

    def ingested(self, batch: IngestBatch) -> None:
        self.users |= batch.users


class Changes:
    def __init__(self) -> None:
        self.changes: list[MembershipChange] = []

    async def membership_changed(self, changes: Sequence[MembershipChange]) -> None:
        self.changes.extend(changes)


@dataclasses.dataclass
class H:
    kernel: Kernel
    sources: SourceService
    ds: DataSources
    audiences: AudienceService
    sink: Sink
    segments: SegmentService
    changes: Changes
    pg: sa.engine.Engine  # to change the customer database between syncs

    async def members(self, audience: str) -> set[str]:
        am = audience_members.c
        async with self.kernel.store.connect() as conn:
            return {r[0] for r in await conn.execute(
                sa.select(am.user_id).where(am.audience == audience))}

    async def user(self, uid: str) -> sa.Row[tuple[object, ...]] | None:
        async with self.kernel.store.connect() as conn:
            return (await conn.execute(sa.select(users).where(users.c.id == uid))).first()


@pytest.fixture
async def h(store: Store, postgres_url: str, tmp_path: Path) -> AsyncIterator[H]:
    seed_postgres(postgres_url)
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                    '[providers.outbox]\nplugin = "outbox"\n'
                    f'[sources.crm]\nurl = "{postgres_url}"\n')
    kernel = Kernel(config=load_config(path, environ={}), app=make_app(), store=store,
                    clock=FakeClock(), bus=Bus(), metrics=Metrics())
    sources = SourceService(kernel)
    ds = DataSources(sources, kernel.app.data_sources, kernel.app.audiences)
    sink, changes = Sink(), Changes()
    segments = SegmentService(kernel, membership_sinks=[changes])
    await segments.start()
    audiences = AudienceService(kernel, ds, ingest_sinks=[sink, segments])
    pg = sa.create_engine(sa.engine.make_url(postgres_url).set(drivername="postgresql+psycopg2"),
                          poolclass=sa.pool.NullPool)
    try:
        yield H(kernel, sources, ds, audiences, sink, segments, changes, pg)
    finally:
        pg.dispose()
        await sources.drain()


async def test_sync_upserts_profiles_as_users_with_email_and_columns(h: H) -> None:
    result = await h.audiences.sync("gardeners")
    assert (result.size, result.joined, result.left) == (2, 2, 0)
    assert await h.members("gardeners") == {"u-ada", "u-bob"}
    ada = await h.user("u-ada")
    assert ada is not None
    assert ada.email == "ada@example.com"
    assert ada.attributes["first_name"] == "Ada"
    assert ada.attributes["phone"] == "+100"
    assert "profile_id" not in ada.attributes
    assert h.sink.users == {"u-ada", "u-bob"}


async def test_sync_merges_into_existing_user_attributes(h: H) -> None:
    now = h.kernel.clock.now()
    async with h.kernel.store.begin() as conn:
        await conn.execute(sa.insert(users).values(
            id="u-ada", email=None, attributes={"plan": "pro", "first_name": "Old"},
            created_at=now, updated_at=now))
    result = await h.audiences.sync("gardeners")
    assert (result.joined, result.updated) == (2, 1)
    ada = await h.user("u-ada")
    assert ada is not None
    assert ada.attributes["plan"] == "pro"  # kept
    assert ada.attributes["first_name"] == "Ada"  # the customer database wins
    assert ada.email == "ada@example.com"


async def test_audience_entries_and_exits_flow_through_the_segment_engine(h: H) -> None:
    await h.audiences.sync("gardeners")
    await h.segments.drain_once()
    entered = {(c.segment, c.user_id) for c in h.changes.changes if c.entered}
    assert entered == {("gardeners", "u-ada"), ("gardeners", "u-bob")}
    with h.pg.begin() as conn:
        conn.exec_driver_sql("DELETE FROM memberships WHERE user_id = 'u-bob'")
    result = await h.audiences.sync("gardeners")
    assert (result.size, result.left) == (1, 1)
    await h.segments.drain_once()
    exits = [(c.segment, c.user_id) for c in h.changes.changes if not c.entered]
    assert exits == [("gardeners", "u-bob")]
    assert await h.members("gardeners") == {"u-ada"}


async def test_injection_profile_id_is_stored_and_matched_as_plain_data(h: H) -> None:
    await h.audiences.sync("cyclists")
    assert await h.members("cyclists") == {INJECTION}
    mal = await h.user(INJECTION)
    assert mal is not None
    assert mal.email == "mallory@example.com"
    preload = PreloadContext(h.ds, h.kernel.store)
    ctx = await preload.context_for(INJECTION, {})
    assert ctx == {"profile": {"plan_name": "Free", "last_login_at": None,
                               "total_purchases": 0, "preferred_language": "de"}}
    assert await h.sources.condition("crm", PREMIUM, {"profile_id": INJECTION}) is True


async def test_preload_gives_the_profile_of_an_audience_member_only(h: H) -> None:
    await h.audiences.sync("gardeners")
    preload = PreloadContext(h.ds, h.kernel.store)
    ctx = await preload.context_for("u-ada", {})
    profile = ctx["profile"]
    assert isinstance(profile, dict)
    assert profile["plan_name"] == "Pro yearly"
    assert isinstance(profile["last_login_at"], str)  # JSON-able for the template
    assert await preload.context_for("u-unknown", {}) == {}


async def test_condition_is_the_result_column_and_no_row_is_false(h: H) -> None:
    assert await h.sources.condition("crm", PREMIUM, {"profile_id": "u-ada"}) is True
    assert await h.sources.condition("crm", PREMIUM, {"profile_id": "u-bob"}) is False
    assert await h.sources.condition("crm", PREMIUM, {"profile_id": "nobody"}) is False
    with pytest.raises(SourceError, match="no 'result' column"):
        await h.sources.condition("crm", "SELECT 1 AS other", {})
    with pytest.raises(SourceError, match=r"no data source 'warehouse'"):
        await h.sources.condition("warehouse", "SELECT true AS result", {})


async def test_audience_without_contact_columns_is_a_clear_error_and_removes_nobody(
        h: H, store: Store) -> None:
    await h.audiences.sync("gardeners")
    app = Segflow(templates="templates")
    app.data_source("bad", source="crm", audience="SELECT id AS profile_id FROM users")
    app.audience_segment("gardeners", data_source="bad")
    broken = AudienceService(h.kernel, DataSources(h.sources, app.data_sources, app.audiences))
    with pytest.raises(SourceError, match="must return profile_id plus email and/or phone"):
        await broken.sync("gardeners")
    assert await h.members("gardeners") == {"u-ada", "u-bob"}
    assert broken.statistics().failures == 1


async def test_discovery_is_served_by_the_audiences_list_action(h: H) -> None:
    reply = await h.kernel.actions["audiences.list"]({"source": "communities"})
    assert isinstance(reply, dict)
    assert [r["community_name"] for r in reply["rows"]] == ["Gardeners", "Cyclists"]
    overview = await h.kernel.actions["audiences.list"]({})
    assert isinstance(overview, dict)
    assert {a["segment"] for a in overview["audiences"]} == {"gardeners", "cyclists"}
