"""Marketing mail apart from transactional mail: ``[email] provider_marketing``.

Campaigns and broadcasts go through the marketing provider, transactions and tests
through ``[email] provider``; each provider claims only its own kinds, at its own pace,
so trouble on one never holds up the other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from delivery_harness import ScriptedProvider, Setup, add_user, make_kernel

from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.providers import SendResult
from segflowd.schema import messages
from segflowd.store import Store

pytestmark = pytest.mark.anyio

KINDS = ("campaign", "broadcast", "transaction", "test")
TWO_PROVIDERS = ('provider_marketing = "bulk"\n', 'plugin = "outbox"\npath = "out/tx"\n'
                 '[providers.bulk]\nplugin = "outbox"\npath = "out/bulk"\n')


def two_providers(store: Store, tmp_path: Path) -> Setup:
    email_extra, options = TWO_PROVIDERS
    return make_kernel(store, tmp_path, provider="tx", options=options,
                       email_extra=email_extra)


async def queue_each_kind(setup: Setup) -> dict[str, int]:
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    ids = {}
    async with setup.kernel.store.begin() as conn:
        for kind in KINDS:
            mid = await enqueue(conn, kind=kind, template="welcome",  # type: ignore[arg-type]
                                now=setup.clock.now(), user_id="u1", dedupe_key=None,
                                to_address=None, data={"plan": "pro"},
                                campaign="onboarding" if kind == "campaign" else None)
            assert mid is not None
            ids[kind] = mid
    return ids


async def rows(store: Store) -> dict[int, sa.RowMapping]:
    async with store.connect() as conn:
        return {int(r["id"]): r for r in (await conn.execute(sa.select(messages))).mappings()}


async def test_each_kind_goes_through_its_own_provider(store: Store, tmp_path: Path) -> None:
    setup = two_providers(store, tmp_path)
    ids = await queue_each_kind(setup)
    svc = DeliveryService(setup.kernel)
    try:
        assert await svc.run_once() == 4
    finally:
        for lane in svc.lanes:
            await lane.provider(setup.kernel).aclose()
    got = await rows(store)
    assert {k: (got[i]["status"], got[i]["provider"]) for k, i in ids.items()} == {
        "campaign": ("sent", "bulk"), "broadcast": ("sent", "bulk"),
        "transaction": ("sent", "tx"), "test": ("sent", "tx")}
    bulk = sorted(p.name for p in (tmp_path / "out" / "bulk").iterdir())
    tx = sorted(p.name for p in (tmp_path / "out" / "tx").iterdir())
    assert [int(n.split("-")[0]) for n in bulk] == sorted([ids["campaign"], ids["broadcast"]])
    assert [int(n.split("-")[0]) for n in tx] == sorted([ids["transaction"], ids["test"]])
    providers = {p.name: p for p in svc.statistics().providers}
    assert (providers["tx"].sent, providers["bulk"].sent) == (2, 2)
    assert svc.statistics().sent == 4
    metrics = setup.kernel.metrics.render()  # each provider's send calls, timed: the
    # outbox writes one file per call (each message marked `sending` before its own)
    assert 'segflow_provider_send_seconds_count{provider="tx"} 2' in metrics
    assert 'segflow_provider_send_seconds_count{provider="bulk"} 2' in metrics


async def test_an_outage_of_the_marketing_provider_holds_up_no_transaction(
        store: Store, tmp_path: Path) -> None:
    setup = two_providers(store, tmp_path)
    ids = await queue_each_kind(setup)
    tx, bulk = ScriptedProvider(), ScriptedProvider()
    bulk.script = [SendResult(ok=False, error="bulk 503: down", transient=True)] * 2
    svc = DeliveryService(setup.kernel, providers={"tx": tx, "bulk": bulk})
    await svc.run_once()
    got = await rows(store)
    assert [got[ids[k]]["status"] for k in KINDS] == ["queued", "queued", "sent", "sent"]
    assert sorted(m.kind for m in tx.sent) == ["test", "transaction"]
    assert sorted(m.kind for m in bulk.sent) == ["broadcast", "campaign"]
    assert all(m.marketing for m in bulk.sent)


async def test_without_a_marketing_provider_one_provider_sends_every_kind(
        store: Store, tmp_path: Path) -> None:
    setup = make_kernel(store, tmp_path)
    await queue_each_kind(setup)
    provider = ScriptedProvider()
    svc = DeliveryService(setup.kernel, providers={"scripted": provider})
    assert [lane.kinds for lane in svc.lanes] == [None]
    assert await svc.run_once() == 4
    assert sorted(m.kind for m in provider.sent) == sorted(KINDS)
