"""Numbered migration steps on real SQLite and MariaDB: an older store is brought up to date."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from segflowd import schema
from segflowd.store import Store

pytestmark = pytest.mark.anyio

INDEX = "ix_flow_instances_live_version"


def _indexes(conn: Connection) -> set[str]:
    return {str(i["name"]) for i in sa.inspect(conn).get_indexes("flow_instances")}


async def test_a_version_1_store_gains_the_live_version_index(store: Store) -> None:
    """m0002: the index a start uses to find instances on older versions."""
    async with store.begin() as conn:  # make the store what version 1 created
        await conn.execute(sa.text(
            "DROP INDEX ix_flow_instances_live_version" if store.dialect == "sqlite"
            else "DROP INDEX ix_flow_instances_live_version ON flow_instances"))
        await conn.execute(sa.text("ALTER TABLE flow_instances DROP COLUMN wait_after"))
        await conn.execute(sa.update(schema.schema_version).values(version=1))
        assert INDEX not in await conn.run_sync(_indexes)
    assert await store.migrate() == 1
    assert await store.read_schema_version() == schema.SCHEMA_VERSION >= 2
    async with store.connect() as conn:
        assert INDEX in await conn.run_sync(_indexes)


async def test_a_version_2_store_gains_wait_after_set_for_pending_event_waits(
        store: Store) -> None:
    """m0003: waits already pending are woken only by events stored after the upgrade."""
    now = dt.datetime(2026, 1, 1)
    async with store.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE flow_instances DROP COLUMN wait_after"))
        await conn.execute(sa.update(schema.schema_version).values(version=2))
        await conn.execute(sa.insert(schema.users).values(
            id="u1", attributes={}, created_at=now, updated_at=now))
        for _n in range(3):
            await conn.execute(sa.insert(schema.events).values(
                user_id="u1", name="paid", attributes={}, created_at=now, received_at=now))
        rows = [dict(campaign="c", user_id="u1", version="v", status=status, live=live,
                     wait_event=event, created_at=now, updated_at=now)
                for status, live, event in [("waiting", 1, "paid"), ("waiting", None, None),
                                            ("completed", None, None)]]
        for i, row in enumerate(rows):
            await conn.execute(sa.insert(sa.table(
                "flow_instances", *(sa.column(k) for k in row))).values(
                **{**row, "campaign": f"c{i}"}))
    assert await store.migrate() == 2
    async with store.connect() as conn:
        got = (await conn.execute(sa.select(
            schema.flow_instances.c.campaign, schema.flow_instances.c.wait_after).order_by(
            schema.flow_instances.c.campaign))).all()
        top = (await conn.execute(sa.select(sa.func.max(schema.events.c.id)))).scalar()
    assert top is not None
    assert top >= 3
    assert [(str(c), a) for c, a in got] == [("c0", top), ("c1", None), ("c2", None)]


async def test_a_version_8_store_gains_message_channels_and_e164_phones(store: Store) -> None:
    """m0009: every message is email's; stored phones are rewritten in E.164 (an inbound
    STOP carries that form), invalid ones left as written."""
    now = dt.datetime(2026, 1, 1)
    async with store.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE messages DROP COLUMN channel"))
        await conn.execute(sa.text("ALTER TABLE messages DROP COLUMN response"))
        await conn.execute(sa.update(schema.schema_version).values(version=8))
        await conn.execute(sa.insert(schema.users), [
            {"id": "ann", "attributes": {"phone": "+1 (415) 555-0100", "name": "Ann"},
             "created_at": now, "updated_at": now},
            {"id": "bob", "attributes": {"phone": "12345"}, "created_at": now,
             "updated_at": now},
            {"id": "cat", "attributes": {"note": "no phone"}, "created_at": now,
             "updated_at": now}])
        await conn.execute(sa.insert(sa.table(
            "messages", *(sa.column(k) for k in ("user_id", "kind", "template", "status",
                                                  "created_at", "updated_at")))).values(
            user_id="ann", kind="campaign", template="t", status="sent", created_at=now,
            updated_at=now))
    assert await store.migrate() == 8
    async with store.connect() as conn:
        people = {r.id: r.attributes for r in await conn.execute(
            sa.select(schema.users.c.id, schema.users.c.attributes))}
        channels = (await conn.execute(sa.select(schema.messages.c.channel))).scalars().all()
    assert people["ann"] == {"phone": "+14155550100", "name": "Ann"}
    assert people["bob"] == {"phone": "12345"}
    assert people["cat"] == {"note": "no phone"}
    assert channels == ["email"]


async def test_a_version_9_store_gains_steps_variants_topics_splits_and_conversions(
        store: Store) -> None:
    """m0010: messages gain step, variant and topic (NULL for those stored before) and an
    index by campaign; flow_splits and conversions are created empty."""
    now = dt.datetime(2026, 1, 1)
    async with store.begin() as conn:
        await conn.execute(sa.text("DROP INDEX ix_messages_campaign ON messages")
                           if store.engine.dialect.name != "sqlite"
                           else sa.text("DROP INDEX ix_messages_campaign"))
        await conn.execute(sa.text("DROP INDEX ix_messages_report ON messages")  # m0011's
                           if store.engine.dialect.name != "sqlite"
                           else sa.text("DROP INDEX ix_messages_report"))
        for column in ("step", "variant", "topic"):
            await conn.execute(sa.text(f"ALTER TABLE messages DROP COLUMN {column}"))
        await conn.execute(sa.text("ALTER TABLE broadcasts DROP COLUMN topic"))
        await conn.execute(sa.text("DROP TABLE flow_splits"))
        await conn.execute(sa.text("DROP TABLE conversions"))
        await conn.execute(sa.update(schema.schema_version).values(version=9))
        await conn.execute(sa.insert(sa.table(
            "messages", *(sa.column(k) for k in ("user_id", "kind", "template", "status",
                                                  "created_at", "updated_at")))).values(
            user_id="ann", kind="campaign", template="t", status="sent", created_at=now,
            updated_at=now))
    assert await store.migrate() == 9
    async with store.begin() as conn:
        old = (await conn.execute(sa.select(
            schema.messages.c.step, schema.messages.c.variant, schema.messages.c.topic))).all()
        await conn.execute(sa.insert(schema.flow_splits).values(
            campaign="c", user_id="ann", name="x", variant="a", created_at=now))
        await conn.execute(sa.insert(schema.conversions).values(
            campaign="c", message_id=1, user_id="ann", event_id=1, event_name="buy",
            converted_at=now))
        splits = (await conn.execute(sa.select(sa.func.count()).select_from(
            schema.flow_splits))).scalar()
    assert [tuple(r) for r in old] == [(None, None, None)]
    assert splits == 1
    assert await store.migrate() == schema.SCHEMA_VERSION  # a second start migrates nothing


async def test_a_version_10_store_gains_message_events(store: Store) -> None:
    """m0011: message_events is created empty, one row per message and kind, and messages
    gain an index on provider_message_id."""
    now = dt.datetime(2026, 1, 1)
    async with store.begin() as conn:
        await conn.execute(sa.text("DROP INDEX ix_messages_provider_id ON messages")
                           if store.engine.dialect.name != "sqlite"
                           else sa.text("DROP INDEX ix_messages_provider_id"))
        await conn.execute(sa.text("DROP TABLE message_events"))
        await conn.execute(sa.update(schema.schema_version).values(version=10))
    assert await store.migrate() == 10
    async with store.begin() as conn:
        await conn.execute(sa.insert(schema.message_events).values(
            message_id=1, kind="delivered", created_at=now))
        rows = (await conn.execute(sa.select(schema.message_events.c.kind))).scalars().all()
        indexes = await conn.run_sync(
            lambda c: {i["name"] for i in sa.inspect(c).get_indexes("messages")})
    assert rows == ["delivered"]
    assert "ix_messages_provider_id" in indexes
    with pytest.raises(sa.exc.IntegrityError):
        async with store.begin() as conn:
            await conn.execute(sa.insert(schema.message_events).values(
                message_id=1, kind="delivered", created_at=now))
    assert await store.migrate() == 11  # a second start migrates nothing
