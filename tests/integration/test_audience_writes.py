"""Audience sync writing users (issue #24, items 5 and 6), on SQLite and MariaDB: a null
email removes the address; a user created or changed by ingest between the sync's read
and its write is merged, not overwritten or crashed on; a failed sync never ends the
daemon's loop."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from customer_db import seed_postgres

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.ingest.users import forget_user
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import audience_members, users
from segflowd.sources.audiences import AudienceService
from segflowd.sources.datasources import DataSources
from segflowd.sources.pools import SourceService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

# Unlike the docs' example, this audience keeps members whose email is NULL.
AUDIENCE = """SELECT u.id AS profile_id, u.email, u.first_name
FROM users u JOIN memberships m ON u.id = m.user_id
WHERE m.community_id = '<%= community_id %>'"""


def make_app() -> Segflow:
    app = Segflow(templates="templates")
    app.data_source("communities", source="crm", audience=AUDIENCE)
    app.audience_segment("gardeners", data_source="communities", values={"community_id": 1})
    return app


class H:
    def __init__(self, kernel: Kernel, audiences: AudienceService,
                 pg: sa.engine.Engine) -> None:
        self.kernel, self.audiences, self.pg = kernel, audiences, pg

    async def user(self, uid: str) -> sa.Row[Any] | None:
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
    audiences = AudienceService(kernel, ds)
    pg = sa.create_engine(sa.engine.make_url(postgres_url).set(drivername="postgresql+psycopg2"),
                          poolclass=sa.pool.NullPool)
    try:
        yield H(kernel, audiences, pg)
    finally:
        pg.dispose()
        await sources.drain()


@pytest.fixture
def before_user_write(store: Store) -> Iterator[list[str]]:
    """Runs the SQL the test appends once, on the sync's own connection, after the sync's
    first read of ``users`` and before its next statement on ``users`` (a write, or a
    second read to write from): as ingest committing in between would."""
    pending: list[str] = []
    reads: list[str] = []
    engine = store.engine.sync_engine

    def hook(conn: sa.Connection, cursor: Any, statement: str, *_a: object) -> None:
        if not pending:
            reads.clear()
            return
        text = " ".join(statement.split()).upper()
        writes = text.startswith(("INSERT", "UPDATE")) and " USERS " in f"{text} "
        read = text.startswith("SELECT") and "FROM USERS" in text
        if read:
            reads.append(text)
        if writes or (read and len(reads) > 1):
            while pending:
                cursor.execute(pending.pop(0))

    sa.event.listen(engine, "before_cursor_execute", hook)
    try:
        yield pending
    finally:
        sa.event.remove(engine, "before_cursor_execute", hook)


async def test_a_null_email_in_the_audience_removes_the_users_address(h: H) -> None:
    """Item 5: the customer removed ada's address; the next sync clears users.email (null
    removes, as in ingest) and the attribute, so delivery stops mailing it."""
    await h.audiences.sync("gardeners")
    ada = await h.user("u-ada")
    assert ada is not None
    assert ada.email == "ada@example.com"
    with h.pg.begin() as pg:
        pg.execute(sa.text("UPDATE users SET email = NULL WHERE id = 'u-ada'"))
    result = await h.audiences.sync("gardeners")
    assert result.updated == 1
    ada = await h.user("u-ada")
    assert ada is not None
    assert ada.email is None
    assert "email" not in ada.attributes
    assert ada.attributes["first_name"] == "Ada"
    cy = await h.user("u-cy")  # never had one
    assert cy is not None
    assert cy.email is None
    assert "email" not in cy.attributes


async def test_a_user_created_between_the_syncs_read_and_write_is_merged(
        h: H, before_user_write: list[str]) -> None:
    """Item 6: ingest creates u-bob after the sync saw no u-bob; the sync merges into the
    new row instead of failing on its primary key (IntegrityError ended the daemon)."""
    before_user_write.append(
        "INSERT INTO users (id, email, attributes, created_at, updated_at) VALUES "
        "('u-bob', NULL, '{\"plan\": \"from-ingest\"}', '2026-01-01 00:00:00', "
        "'2026-01-01 00:00:00')")
    result = await h.audiences.sync("gardeners")
    assert not before_user_write  # the race did happen
    assert result.size == 3
    bob = await h.user("u-bob")
    assert bob is not None
    assert bob.attributes["plan"] == "from-ingest"  # ingest's write survives
    assert bob.attributes["first_name"] == "Bob"
    assert bob.email == "bob@example.com"


async def test_an_ingest_update_between_the_syncs_read_and_write_is_not_lost(
        h: H, before_user_write: list[str]) -> None:
    """Item 6: ingest (already answered 2xx) changes ada between the sync's read and its
    write; the sync merges onto the current row instead of writing back what it read."""
    await h.audiences.sync("gardeners")
    with h.pg.begin() as pg:
        pg.execute(sa.text("UPDATE users SET first_name = 'Adele' WHERE id = 'u-ada'"))
    before_user_write.append(
        "UPDATE users SET attributes = '{\"email\": \"ada@example.com\", "
        "\"first_name\": \"Ada\", \"plan\": \"from-ingest\"}' WHERE id = 'u-ada'")
    await h.audiences.sync("gardeners")
    assert not before_user_write
    ada = await h.user("u-ada")
    assert ada is not None
    assert ada.attributes["plan"] == "from-ingest"
    assert ada.attributes["first_name"] == "Adele"


async def test_sync_due_records_any_failure_and_returns(
        h: H, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 6: an unexpected exception in a sync (here a store error) is logged and kept
    in the audience's state; sync_due returns, so the daemon's loop goes on."""
    async def broken(*_a: object, **_k: object) -> object:
        raise sa.exc.IntegrityError("INSERT INTO users", {}, Exception("Duplicate entry"))

    monkeypatch.setattr(h.audiences, "_sync", broken)
    h.audiences._state["gardeners"].next_at = h.kernel.clock.now()
    assert await h.audiences.sync_due() == []
    stats = h.audiences.statistics()
    assert stats.failures == 1
    assert "gardeners" in stats.last_errors
    st = h.audiences._state["gardeners"]
    assert not st.syncing
    assert st.next_at is not None
    assert st.next_at > h.kernel.clock.now()


async def test_a_forgotten_user_is_not_synced_back_within_the_forget_window(h: H) -> None:
    """The customer's database still lists ada after DELETE /v1/users/u-ada: the sync
    leaves her out (as ingest refuses her events) until the window has passed."""
    first = await h.audiences.sync("gardeners")
    async with h.kernel.store.begin() as conn:
        assert await forget_user(conn, "u-ada", h.kernel.clock.now())
    again = await h.audiences.sync("gardeners")
    assert await h.user("u-ada") is None
    assert (again.forgotten, again.size) == (1, first.size - 1)
    async with h.kernel.store.connect() as conn:
        assert (await conn.execute(sa.select(audience_members.c.user_id).where(
            audience_members.c.user_id == "u-ada"))).all() == []
    clock = h.kernel.clock
    assert isinstance(clock, FakeClock)
    clock.set(clock.now() + dt.timedelta(days=31))  # the default window is 30 days
    later = await h.audiences.sync("gardeners")
    assert (later.forgotten, later.size) == (0, first.size)
    assert await h.user("u-ada") is not None
