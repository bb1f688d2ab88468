"""Forget holds (issue #24, item 12), on SQLite and MariaDB: after ``DELETE
/v1/users/{id}`` a late event or identify for the id — a client's retry of an old event
too — is refused with 409 on the native, Segment and Customer.io APIs and stores nothing,
within ``[retention] forget_window``; ``PUT /v1/users/{id}`` re-creates the user."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from test_ingest import SECRET, Harness, basic, bearer, harness

from segflowd import schema
from segflowd.ingest.users import id_hash
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

UID = "zed-4711"


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(store, tmp_path) as running:
        yield running


async def _forget(h: Harness, uid: str = UID) -> None:
    r = await h.http.put(f"/v1/users/{uid}", headers=bearer(),
                         json={"attributes": {"email": "zed@example.com"}})
    assert r.status_code == 200
    r = await h.http.post(f"/v1/users/{uid}/events", headers=bearer(),
                          json={"name": "paid", "id": "evt-1"})
    assert r.status_code == 202
    r = await h.http.delete(f"/v1/users/{uid}", headers=bearer())
    assert r.json()["deleted"] is True


async def _gone(h: Harness, uid: str = UID) -> None:
    assert await h.rows(schema.users, schema.users.c.id == uid) == []
    assert await h.rows(schema.events, schema.events.c.user_id == uid) == []


def _refused(r: httpx.Response, uid: str = UID) -> str:
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "user_forgotten"
    assert repr(uid) in error["message"]
    return str(error["message"])


async def test_a_late_native_event_and_a_retry_of_an_old_one_are_refused(h: Harness) -> None:
    await _forget(h)
    _refused(await h.http.post(f"/v1/users/{UID}/events", headers=bearer(),
                               json={"name": "clicked"}))
    # The retry of an event stored before the forget (its dedupe key went with it).
    _refused(await h.http.post(f"/v1/users/{UID}/events", headers=bearer(),
                               json={"name": "paid", "id": "evt-1"}))
    await _gone(h)
    stats = h.service.statistics()
    assert stats.forgotten == 2
    assert stats.rejected == 2


async def test_segment_track_identify_and_alias_are_refused(h: Harness) -> None:
    await _forget(h)
    for kind, body in [("track", {"userId": UID, "event": "paid", "messageId": "m1"}),
                       ("identify", {"userId": UID, "traits": {"plan": "pro"}}),
                       ("alias", {"userId": UID, "previousId": "anon-1"})]:
        _refused(await h.http.post(f"/v1/{kind}", headers=basic(SECRET), json=body))
    await _gone(h)


async def test_a_segment_batch_with_one_forgotten_item_is_refused_naming_it(
        h: Harness) -> None:
    """Segment's API answers a batch as a whole: 409 naming the item, nothing stored."""
    await _forget(h)
    batch = [{"type": "track", "userId": "ann", "event": "paid"},
             {"type": "identify", "userId": UID, "traits": {"plan": "pro"}}]
    message = _refused(await h.http.post("/v1/batch", headers=basic(SECRET),
                                         json={"batch": batch}))
    assert message.startswith("batch[1]: ")
    await _gone(h)
    assert await h.rows(schema.users, schema.users.c.id == "ann") == []


async def test_customerio_customer_and_event_are_refused(h: Harness) -> None:
    await _forget(h)
    auth = basic("site-a", SECRET)
    _refused(await h.http.put(f"/api/v1/customers/{UID}", headers=auth,
                              json={"plan": "pro"}))
    _refused(await h.http.post(f"/api/v1/customers/{UID}/events", headers=auth,
                               json={"name": "paid"}))
    await _gone(h)


async def test_put_user_recreates_a_forgotten_user_and_clears_the_tombstone(
        h: Harness) -> None:
    await _forget(h)
    r = await h.http.put(f"/v1/users/{UID}", headers=bearer(), json={"attributes": {}})
    assert r.status_code == 200
    assert await h.rows(schema.forgotten) == []
    r = await h.http.post(f"/v1/users/{UID}/events", headers=bearer(),
                          json={"name": "paid", "id": "evt-1"})
    assert r.status_code == 202
    assert r.json()["duplicate"] is False


async def test_the_tombstone_is_a_hash_and_expires_after_the_window(h: Harness) -> None:
    await _forget(h)
    rows = await h.rows(schema.forgotten)
    assert [r.id_hash for r in rows] == [id_hash(UID)]
    assert UID not in rows[0].id_hash
    clock = h.kernel.clock
    assert isinstance(clock, FakeClock)
    clock.set(clock.now() + dt.timedelta(days=31))
    r = await h.http.post(f"/v1/users/{UID}/events", headers=bearer(), json={"name": "x"})
    assert r.status_code == 202


async def test_other_users_are_unaffected(h: Harness) -> None:
    await _forget(h)
    r = await h.http.post("/v1/users/ann/events", headers=bearer(), json={"name": "paid"})
    assert r.status_code == 202


async def test_a_version_4_store_gains_the_forgotten_table(store: Store) -> None:
    """m0005 creates ``forgotten`` on a store upgraded from version 4."""
    async with store.begin() as conn:
        await conn.execute(sa.text("DROP TABLE forgotten"))
        await conn.execute(sa.update(schema.schema_version).values(version=4))
    assert await store.migrate() == 4
    assert await store.read_schema_version() == schema.SCHEMA_VERSION
    now = dt.datetime(2026, 1, 1)
    async with store.begin() as conn:
        await conn.execute(sa.insert(schema.forgotten).values(id_hash="ab" * 32,
                                                              forgotten_at=now))
        assert (await conn.execute(sa.select(schema.forgotten.c.forgotten_at))).scalar() == now
