"""``POST /api/v1/merge_customers`` and the device routes against concurrent writes, on
SQLite and MariaDB.

The merge is one store transaction outside the group committer; these tests make other
requests while that transaction is open (or between the steps of a device write) and
check that what those requests were answered 2xx for holds, and that no row is left
naming a user who does not exist.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import httpx
import pytest
import sqlalchemy as sa
from delivery_harness import NOW, add_user, load_test_app, write_app, write_config
from sqlalchemy.ext.asyncio import AsyncConnection
from test_cio_track import CIO, _user
from test_ingest import Harness, harness

from segflowd import schema
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.http import Router
from segflowd.ingest import cio_track, merge
from segflowd.ingest.service import IngestService
from segflowd.ingest.writes import CommitResult, Write
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

MERGE = {"primary": {"id": "p"}, "secondary": {"id": "s"}}
SEND_KEY = "secret-send"


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(store, tmp_path) as running:
        yield running


async def _queued(h: Harness, request: Awaitable[httpx.Response]) -> asyncio.Task[httpx.Response]:
    """Start ``request`` and return once it handed its writes to the committer (whose
    flush may then wait for the merge's locks)."""
    committer = h.service.committer
    real = committer.submit
    handed = anyio.Event()

    async def submit(writes: Sequence[Write]) -> CommitResult:
        handed.set()
        return await real(writes)

    committer.submit = submit  # type: ignore[method-assign]
    try:
        task = asyncio.ensure_future(request)
        with anyio.fail_after(10):
            await handed.wait()
        await asyncio.sleep(0.05)  # let the flush start (it then waits for the locks)
    finally:
        committer.submit = real  # type: ignore[method-assign]
    return task


def _during_merge(monkeypatch: pytest.MonkeyPatch,
                  act: Callable[[], Awaitable[asyncio.Task[httpx.Response]]]
                  ) -> list[asyncio.Task[httpx.Response]]:
    """Run ``act`` inside the merge's transaction, after the merge's own statements."""
    real = merge.merge_users
    started: list[asyncio.Task[httpx.Response]] = []

    async def racing(conn: AsyncConnection, primary: str, secondary: str,
                     now: dt.datetime) -> merge.Merged:
        done = await real(conn, primary, secondary, now)
        started.append(await act())
        return done

    monkeypatch.setattr(merge, "merge_users", racing)
    return started


async def _orphans(h: Harness) -> set[str]:
    """Users named by events or devices who do not exist."""
    users = {u.id for u in await h.rows(schema.users)}
    named = {e.user_id for e in await h.rows(schema.events) if e.user_id is not None}
    named |= {d.user_id for d in await h.rows(schema.devices)}
    return named - users


async def test_an_identify_of_the_primary_during_a_merge_keeps_its_value(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge re-writes the attributes the primary gained; it must not overwrite one
    that an identify acknowledged while the merge ran set since."""
    await _user(h, "p", email="p@example.com")
    await _user(h, "s", plan="free", city="Oslo")
    started = _during_merge(monkeypatch, lambda: _queued(h, h.http.put(
        "/api/v1/customers/p", headers=CIO, json={"plan": "pro"})))
    r = await h.http.post("/api/v1/merge_customers", headers=CIO, json=MERGE)
    assert r.status_code == 200, r.text
    (identify,) = started
    assert (await identify).status_code == 200
    (p,) = await h.rows(schema.users)
    # Either order of the two gives plan "pro": the primary's own value wins a merge.
    assert p.attributes == {"email": "p@example.com", "plan": "pro", "city": "Oslo"}


async def test_an_event_of_the_secondary_during_a_merge_is_not_orphaned(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The committer remembers the secondary as existing; an event of theirs it flushes
    while the merge runs must not be stored for a user who no longer exists, nor may the
    committer keep believing in them afterwards."""
    await _user(h, "p", plan="pro")
    await _user(h, "s", plan="free")
    r = await h.http.post("/api/v1/customers/s/events", headers=CIO, json={"name": "seen"})
    assert r.status_code == 200  # the committer now knows "s"
    started = _during_merge(monkeypatch, lambda: _queued(h, h.http.post(
        "/api/v1/customers/s/events", headers=CIO, json={"name": "racing"})))
    r = await h.http.post("/api/v1/merge_customers", headers=CIO, json=MERGE)
    assert r.status_code == 200, r.text
    (event,) = started
    assert (await event).status_code == 200
    r = await h.http.post("/api/v1/customers/s/events", headers=CIO, json={"name": "later"})
    assert r.status_code == 200
    assert await _orphans(h) == set()
    names = sorted(e.name for e in await h.rows(schema.events))
    assert names == ["later", "racing", "seen"]  # every acknowledged event is kept


async def test_a_device_added_while_its_user_is_merged_away_is_kept(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a device makes the user if needed; a merge that removes the user between
    that and the device's own transaction is not a forget and must not lose the device."""
    await _user(h, "p", plan="pro")
    await _user(h, "s", plan="free")
    real = cio_track.apply_device_ops
    merged: list[int] = []

    async def merge_first(*args: object, **kwargs: object) -> set[str]:
        if not merged:
            r = await h.http.post("/api/v1/merge_customers", headers=CIO, json=MERGE)
            merged.append(r.status_code)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cio_track, "apply_device_ops", merge_first)
    r = await h.http.put("/api/v1/customers/s/devices", headers=CIO,
                         json={"device": {"id": "tok-1", "platform": "ios"}})
    assert merged == [200]
    assert r.status_code == 200, r.text
    (device,) = await h.rows(schema.devices)
    assert await _orphans(h) == set()
    assert device.user_id == "s"  # the id is free after a merge: a new user "s"


async def test_a_forgotten_user_is_not_recreated_by_a_device_write(h: Harness) -> None:
    await _user(h, "s", plan="free")
    assert (await h.http.delete("/api/v1/customers/s", headers=CIO)).status_code == 200
    r = await h.http.put("/api/v1/customers/s/devices", headers=CIO,
                         json={"device": {"id": "tok-1", "platform": "ios"}})
    assert r.status_code == 409
    r = await h.http.post("/api/v2/entity", headers=CIO, json={
        "type": "person", "action": "add_device", "identifiers": {"id": "s"},
        "device": {"token": "tok-1", "platform": "ios"}})
    assert r.status_code == 409
    assert await h.rows(schema.users) == []
    assert await h.rows(schema.devices) == []
    async with h.store.connect() as conn:
        left = (await conn.execute(sa.select(sa.func.count()).select_from(schema.events)
                                   )).scalar_one()
    assert left == 0


# -- a send racing a merge ---------------------------------------------------------------

@pytest.fixture
async def mailer(store: Store, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The ingest routes (sends and the Customer.io Track API) of an app with templates."""
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text() + f'[[http.keys]]\nname = "site"\nsecret = "{SEND_KEY}"\n')
    config = load_config(cfg, environ={})
    kernel = Kernel(config=config, app=load_test_app(write_app(tmp_path)), store=store,
                    clock=FakeClock(NOW), bus=Bus(), metrics=Metrics())
    ingest = IngestService(kernel)
    router = Router()
    ingest.register_routes(router)
    async with anyio.create_task_group() as tg:
        await tg.start(ingest.run)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router),
                                     base_url="http://segflow") as http:
            yield http
        await ingest.drain()


async def test_a_send_to_the_secondary_during_a_merge_names_no_deleted_user(
        store: Store, mailer: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A send reads its user as the merge deletes them: it must either wait and find no
    user, or be moved with the secondary's messages; never be queued for a user who is
    gone (delivery would have no one to address it to)."""
    await add_user(store, "p", "p@example.com")
    await add_user(store, "s", "s@example.com")
    auth = {"Authorization": f"Bearer {SEND_KEY}"}

    async def send() -> asyncio.Task[httpx.Response]:
        task = asyncio.ensure_future(mailer.post("/v1/send/receipt", headers=auth, json={
            "user_id": "s", "data": {"amount": "1"}}))
        await asyncio.sleep(0.05)  # its transaction reads the user (or waits to)
        return task

    started = _during_merge(monkeypatch, send)
    r = await mailer.post("/api/v1/merge_customers", json=MERGE,
                          headers={"Authorization": "Basic " + base64.b64encode(
                              f"site:{SEND_KEY}".encode()).decode()})
    assert r.status_code == 200, r.text
    (task,) = started
    answer = await task
    async with store.connect() as conn:
        users = set((await conn.execute(sa.select(schema.users.c.id))).scalars())
        queued = list((await conn.execute(sa.select(schema.messages.c.user_id))).scalars())
    assert set(queued) <= users
    assert answer.status_code in (202, 400), answer.text
    assert len(queued) == (answer.status_code == 202)
