"""Holds under failure: retention while a campaign is paused, a store outage in the
middle of a resume, and entries an outage held back meeting the resume's sweep.

Same harness as test_flow_holds.py (joins and leaves recorded in ``segment_changes``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_flow_holds import Recorded, hold_app
from test_flows import DAY, make_app, store_down

from segflowd.config import Age, RetentionConfig
from segflowd.errors import StoreUnavailable
from segflowd.flows import work as flows_work
from segflowd.hooks import MembershipChange
from segflowd.retention import rules
from segflowd.retention.prune import Pruner
from segflowd.schema import segment_changes, segment_members
from segflowd.store import Store

pytestmark = pytest.mark.anyio


@pytest.fixture
def h(store: Store, tmp_path: Path) -> Recorded:
    return Recorded(store, tmp_path)


async def _prune(h: Recorded) -> None:
    """One retention pass over segment changes older than a day."""
    cfg = RetentionConfig(finished_instances=None, segment_changes=Age(DAY), messages=None,
                          forget_window=None)
    async with h.store.connect() as conn:
        g = await rules.load_guards(conn, hold_app())
    await Pruner(h.store, cfg, pause=0, count=lambda kind, n: None).run(g, h.clock.now())


async def test_retention_keeps_the_changes_a_paused_campaign_holds(
        h: Recorded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "CATCH_UP_CHANGES", 0)  # no replay window to hide behind
    app = hold_app()
    for u in ("bob", "cy"):
        await h.user(u)
    async with h.running(app) as svc:
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        await h.join("bob", "seg")  # held
        await h.advance(30 * DAY)  # a long pause
        await h.join("cy", "other")  # a newer change, so bob's is not the newest
        await svc._save_changes_cursor()  # as its saver does every few seconds
    await _prune(h)  # the flows' changes cursor is past bob's change, the marker is not
    async with h.store.connect() as conn:
        kept = [r[0] for r in await conn.execute(sa.select(segment_changes.c.user_id))]
    assert "bob" in kept
    async with h.running(app) as svc:
        reply = await svc.k.actions["campaign.resume"]({"campaign": "onboarding"})
        assert reply["held_entered"] == 1  # type: ignore[index]
    assert await h.count("bob") == 1


async def test_a_removed_campaigns_marker_does_not_keep_changes_forever(
        h: Recorded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "CATCH_UP_CHANGES", 0)
    await h.user("bob")
    async with h.running(make_app("gone", hold_app().campaigns["onboarding"].flow)) as svc:
        await svc.k.actions["campaign.pause"]({"campaign": "gone"})
        await h.join("bob", "seg")
        await h.advance(30 * DAY)
        await h.join("bob", "other")
        await svc._save_changes_cursor()
    await _prune(h)  # "gone" is not in the app the pass reads: its marker holds nothing
    async with h.store.connect() as conn:
        left = [r[0] for r in await conn.execute(sa.select(segment_changes.c.segment))]
    assert left == ["other"]


def one_send(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.send_email("welcome")


async def test_a_resume_cut_by_an_outage_lets_the_held_in_once_the_store_is_back(
        h: Recorded, monkeypatch: pytest.MonkeyPatch) -> None:
    app = hold_app()
    await h.user("bob")
    async with h.running(app) as svc:
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        await h.join("bob", "seg")
        matched = svc._match_campaign
        down = store_down(h.store, reads=True)

        async def then_down(name: str) -> None:  # the store goes down after the match
            await matched(name)
            down.__enter__()

        monkeypatch.setattr(svc, "_match_campaign", then_down)
        with pytest.raises(StoreUnavailable):
            await svc.k.actions["campaign.resume"]({"campaign": "onboarding"})
        down.__exit__(None, None, None)
        assert await h.count("bob") == 0
        await h.advance(2 * flows_work.RESYNC_RETRY)  # the store is back: resync
        assert await h.count("bob") == 1
    assert await h.sent("bob") == [("welcome", 0)]
    assert not await h.marker("onboarding")


async def test_an_entry_an_outage_held_back_is_not_made_twice_by_a_resume(
        h: Recorded) -> None:
    app = make_app("onboarding", one_send, reentry=True)
    await h.user("bob")
    async with h.running(app) as svc:
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        now = h.clock.now()
        async with h.store.begin() as conn:  # the segment engine commits bob's join ...
            await conn.execute(sa.insert(segment_members).values(
                segment="seg", user_id="bob", entered_at=now, evaluated_at=now))
            await conn.execute(sa.insert(segment_changes).values(
                segment="seg", user_id="bob", entered=True, at=now))
        with store_down(h.store, reads=True):  # ... and flows cannot read it: held
            await svc.membership_changed([MembershipChange("seg", "bob", True, now)])
        assert len(svc._held) == 1
        await h.advance(dt.timedelta(seconds=0.1).total_seconds())
        reply = await svc.k.actions["campaign.resume"]({"campaign": "onboarding"})
        await h.settle()  # entered by whichever path, its one send done
        await h.advance(2 * flows_work.RESYNC_RETRY)  # the resync applies the held join
        assert reply["held_entered"] in (0, 1)  # type: ignore[index]
    assert await h.count("bob") == 1
    assert await h.sent("bob") == [("welcome", 0)]


async def test_a_join_committed_before_a_resume_but_handed_over_after_it_enters_once(
        h: Recorded) -> None:
    app = make_app("onboarding", one_send, reentry=True)
    await h.user("bob")
    async with h.running(app) as svc:
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        now = h.clock.now()
        async with h.store.begin() as conn:  # a refresh commits bob's join ...
            await conn.execute(sa.insert(segment_members).values(
                segment="seg", user_id="bob", entered_at=now, evaluated_at=now))
            await conn.execute(sa.insert(segment_changes).values(
                segment="seg", user_id="bob", entered=True, at=now))
        # ... the resume runs before it hands the join to flows: the sweep enters bob
        reply = await svc.k.actions["campaign.resume"]({"campaign": "onboarding"})
        assert reply["held_entered"] == 1  # type: ignore[index]
        await h.settle()  # bob's one send, and the instance completes
        await h.advance(60)
        await svc.membership_changed([MembershipChange("seg", "bob", True, now)])
        await h.settle()
        # a later join is a new entry, as reentry allows
        await h.leave("bob", "seg")
        await h.join("bob", "seg")
    assert await h.count("bob") == 2
    assert [name for name, _ in await h.sent("bob")] == ["welcome", "welcome"]


def no_timeout(ctx: Any, rt: Any) -> Generator[object, object, object]:
    bought = yield rt.wait_for_event("purchase")  # no timeout: never None
    yield rt.send_email("thanks", amount=bought.attributes["amount"])  # type: ignore[attr-defined]


async def test_a_wait_for_event_with_no_timeout_is_not_woken_into_a_none(
        h: Recorded) -> None:
    from segflowd.errors import FlowError

    app = make_app("cart", no_timeout)
    await h.user("fay")
    async with h.running(app) as svc:
        await h.join("fay", "seg")
        [inst] = await h.instances("fay")
        with pytest.raises(FlowError, match="no timeout"):
            await svc.k.actions["instance.wake"]({"instance": inst.id})
        await h.settle()
        [inst] = await h.instances("fay")
        assert inst.status == "waiting"  # not failed on None.attributes


async def test_a_pause_that_committed_reports_success_even_if_the_count_fails(
        h: Recorded, monkeypatch: pytest.MonkeyPatch) -> None:
    app = hold_app()
    async with h.running(app) as svc:
        set_paused = svc._set_paused
        down = store_down(h.store, reads=True)

        async def then_down(name: str, paused: bool) -> None:  # down after the commit
            await set_paused(name, paused)
            down.__enter__()

        monkeypatch.setattr(svc, "_set_paused", then_down)
        try:
            reply = await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        finally:
            down.__exit__(None, None, None)
        assert reply == {"campaign": "onboarding", "paused": True}
        assert svc.statistics().paused == ("onboarding",)
