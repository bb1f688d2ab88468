"""The outbox on real stores: enqueue and enqueue_many queue each dedupe key once."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from segflowd.delivery.outbox import DEDUPE_CHUNK, Queued, enqueue, enqueue_many
from segflowd.schema import messages
from segflowd.store import Store

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 11, 1, 12, 0, 0)


def item(key: str, user: str = "u1") -> Queued:
    return Queued(kind="campaign", template="welcome", user_id=user, dedupe_key=key,
                  data={"n": key}, campaign="onboarding", instance_id=7)


async def rows(store: Store) -> list[sa.Row[tuple[object, ...]]]:
    async with store.connect() as conn:
        return list(await conn.execute(sa.select(messages).order_by(messages.c.id)))


async def test_enqueue_many_skips_keys_queued_before_and_repeated_in_the_call(
        store: Store) -> None:
    async with store.begin() as conn:
        assert await enqueue(conn, kind="campaign", template="welcome", now=NOW,
                             user_id="u1", dedupe_key="k1") is not None
    async with store.begin() as conn:
        queued = await enqueue_many(conn, [item("k1"), item("k2"), item("k2"), item("k3")],
                                    now=NOW)
    assert queued == 2
    got = await rows(store)
    assert [r.dedupe_key for r in got] == ["k1", "k2", "k3"]
    k2 = got[1]
    assert (k2.status, k2.kind, k2.campaign, k2.instance_id, k2.data) == (
        "queued", "campaign", "onboarding", 7, {"n": "k2"})
    async with store.begin() as conn:  # a retried round queues nothing new
        assert await enqueue_many(conn, [item("k2"), item("k3")], now=NOW) == 0
    assert len(await rows(store)) == 3


async def test_enqueue_many_handles_more_keys_than_one_lookup_holds(store: Store) -> None:
    n = DEDUPE_CHUNK * 2 + 7
    async with store.begin() as conn:
        await enqueue_many(conn, [item(f"a{i}") for i in range(DEDUPE_CHUNK + 1)], now=NOW)
    async with store.begin() as conn:
        queued = await enqueue_many(conn, [item(f"a{i}", user=f"u{i}") for i in range(n)],
                                    now=NOW)
    assert queued == n - (DEDUPE_CHUNK + 1)
    got = await rows(store)
    assert len(got) == n
    assert len({r.dedupe_key for r in got}) == n
