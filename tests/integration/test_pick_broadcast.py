"""Pick-and-send: a broadcast to the audience of a discovered row of a real PostgreSQL
customer database, picked at run time (store on SQLite and MariaDB): synced under a
generated segment, once per user across a restart, typed values, a dry run that writes
nothing, and clear errors for a bad pick."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from customer_db import AUDIENCE, DISCOVERY, INJECTION, PRELOAD, seed_postgres

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.errors import SourceError
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import audience_members, broadcasts, messages, users
from segflowd.sources.audiences import AudienceService
from segflowd.sources.broadcasts import BroadcastError, BroadcastService
from segflowd.sources.datasources import DataSources, PreloadContext
from segflowd.sources.picked import PickError, parse_name
from segflowd.sources.pools import SourceService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

# The audience query with a bare placeholder: bound with the value's own type, so the
# integer column is compared with an integer (a text "1" would not be the same query).
# The bound value also comes back as a column, so its type is seen in the user's attributes.
TYPED_AUDIENCE = AUDIENCE.replace("'<%= community_id %>'", "<%= community_id %>").replace(
    "u.last_name", "u.last_name, <%= community_id %> + 0 AS picked_community")
GARDENERS = 'communities:{"community_id":1}'


def make_app() -> Segflow:
    app = Segflow(templates="templates")
    app.data_source("communities", source="crm", discovery=DISCOVERY, audience=AUDIENCE,
                    preload=PRELOAD)
    app.data_source("typed", source="crm", discovery=DISCOVERY, audience=TYPED_AUDIENCE)
    app.template("spring-sale", subject="Spring", html="spring.html")
    return app


@dataclasses.dataclass
class H:
    kernel: Kernel
    sources: SourceService
    ds: DataSources
    audiences: AudienceService

    def broadcasts(self) -> BroadcastService:
        """A broadcast service as a (re)started daemon builds it."""
        return BroadcastService(self.kernel)

    async def rows(self, query: sa.Select[tuple[object, ...]]) -> list[tuple[object, ...]]:
        async with self.kernel.store.connect() as conn:
            return [tuple(r) for r in await conn.execute(query)]


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
    audiences = AudienceService(kernel, ds)
    try:
        yield H(kernel, sources, ds, audiences)
    finally:
        await sources.drain()


async def test_broadcast_to_a_picked_row_survives_a_restart_and_sends_each_user_once(
        h: H) -> None:
    first = h.broadcasts()  # registers broadcast.launch; not running: one batch by hand
    reply = await h.kernel.actions["broadcast.launch"](
        {"data_source": "communities", "values": {"community_id": 1},
         "template": "spring-sale", "rate": 1})
    assert isinstance(reply, dict)
    bid = int(reply["id"])  # type: ignore[call-overload]  # a JSON value
    assert (reply["segment"], reply["total"], reply["status"]) == (GARDENERS, 2, "running")
    m = messages.c
    sent = sa.select(m.user_id, m.dedupe_key).where(m.kind == "broadcast")
    assert await first.step(bid) == 1.0  # one user of two, then the daemon stops
    assert len(await h.rows(sent)) == 1
    # The audience is synced into users under its generated segment, which a restart
    # reads back: the preload (template `profile`) works as for a declared audience.
    am = audience_members.c
    assert sorted(await h.rows(sa.select(am.user_id).where(am.audience == GARDENERS))) == [
        ("u-ada",), ("u-bob",)]
    assert await h.rows(sa.select(users.c.email).where(users.c.id == "u-ada")) == [
        ("ada@example.com",)]
    ctx = await PreloadContext(h.ds, h.kernel.store).context_for("u-ada", {})
    assert ctx["profile"]["plan_name"] == "Pro yearly"  # type: ignore[index]  # a dict
    second = h.broadcasts()  # the restarted daemon resumes the broadcast at start
    clock = h.kernel.clock
    assert isinstance(clock, FakeClock)
    async with anyio.create_task_group() as tg:
        await tg.start(second.run)
        for _ in range(200):
            status = await h.rows(sa.select(broadcasts.c.status)
                                  .where(broadcasts.c.id == bid))
            if status == [("completed",)]:
                break
            await clock.advance(1.0)
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert status == [("completed",)]
    assert sorted(await h.rows(sent)) == [("u-ada", f"bc:{bid}:u-ada"),
                                         ("u-bob", f"bc:{bid}:u-bob")]


async def test_values_keep_their_types_in_the_bound_query_and_the_segment_name(
        h: H) -> None:
    h.broadcasts()
    reply = await h.kernel.actions["audiences.pick"](
        {"data_source": "typed", "values": {"community_id": 2}})
    assert isinstance(reply, dict)
    assert reply["segment"] == 'typed:{"community_id":2}'  # 2, never "2"
    assert reply["size"] == 1
    am = audience_members.c
    assert await h.rows(sa.select(am.user_id).where(am.audience == reply["segment"])) == [
        (INJECTION,)]  # the injection id is plain data, bound as a parameter
    (attrs,) = await h.rows(sa.select(users.c.attributes).where(users.c.id == INJECTION))
    assert attrs[0]["picked_community"] == 2  # the bound value, in the query's arithmetic
    # A restart reads the pick back from the stored name, types and all (the preload
    # binds these values).
    assert parse_name(str(reply["segment"]), h.kernel.app.data_sources) == (
        "typed", {"community_id": 2})
    assert parse_name('typed:{"community_id":"2"}', h.kernel.app.data_sources) == (
        "typed", {"community_id": "2"})  # the text "2" is another pick
    assert parse_name('typed:{"community_id": 2}', h.kernel.app.data_sources) is None
    assert parse_name('nope:{"community_id":2}', h.kernel.app.data_sources) is None


async def test_dry_run_reports_count_and_sample_and_writes_nothing(h: H) -> None:
    h.broadcasts()
    reply = await h.kernel.actions["broadcast.launch"](
        {"data_source": "communities", "values": {"community_id": 1},
         "template": "spring-sale", "dry_run": True})
    assert isinstance(reply, dict)
    assert (reply["dry_run"], reply["count"], reply["segment"]) == (True, 2, GARDENERS)
    sample = reply["sample"]
    assert isinstance(sample, list)
    assert [r["profile_id"] for r in sample] == ["u-ada", "u-bob"]
    assert sample[0]["profile"]["plan_name"] == "Pro yearly"
    assert await h.rows(sa.select(audience_members.c.user_id)) == []
    assert await h.rows(sa.select(broadcasts.c.id)) == []
    assert await h.rows(sa.select(users.c.id)) == []


async def test_a_bad_pick_is_refused_before_anything_is_written(h: H) -> None:
    h.broadcasts()
    launch = h.kernel.actions["broadcast.launch"]
    base = {"template": "spring-sale", "values": {"community_id": 1}}
    with pytest.raises(SourceError, match="no data source 'nope'"):
        await launch({**base, "data_source": "nope"})
    with pytest.raises(PickError, match="has no placeholder 'communty'"):
        await launch({**base, "data_source": "communities", "values": {"communty": 1}})
    with pytest.raises(PickError, match=r"uses <%= community_id %>"):
        await launch({**base, "data_source": "communities", "values": {}})
    with pytest.raises(PickError, match="must be a number, text"):
        await launch({**base, "data_source": "communities", "values": {"community_id": [1]}})
    with pytest.raises(BroadcastError, match="unknown template 'nope'"):
        await launch({**base, "data_source": "communities", "template": "nope"})
    with pytest.raises(BroadcastError, match="not both"):
        await launch({**base, "data_source": "communities", "segment": "x"})
    with pytest.raises(BroadcastError, match="unknown segment 'cyclists'"):
        await launch({"segment": "cyclists", "template": "spring-sale"})
    assert await h.rows(sa.select(audience_members.c.user_id)) == []
    assert await h.rows(sa.select(broadcasts.c.id)) == []

