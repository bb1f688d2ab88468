"""Paused campaigns hold their entries (``on_pause``), and ``instance.wake``, on SQLite
and MariaDB.

FlowService is driven directly, as in test_flows.py, but each join and leave is also
recorded in ``segment_changes`` as the segment engine records it: the resume sweep reads
the changes made while the campaign was paused from there.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_flows import DAY, Flow, Harness, awaiting, make_app, onboarding

from segflowd.app import Segflow
from segflowd.errors import AppError, FlowError
from segflowd.flows.held import marker_name, waiting_entries
from segflowd.hooks import MembershipChange
from segflowd.schema import (
    campaign_settings,
    engine_cursors,
    flow_instances,
    flow_journal,
    segment_changes,
    segment_members,
)
from segflowd.store import Store

pytestmark = pytest.mark.anyio


class Recorded(Harness):
    """Joins and leaves recorded in segment_changes, then handed to the service."""

    async def _change(self, uid: str, segment: str, entered: bool) -> None:
        now = self.clock.now()
        sm = segment_members.c
        async with self.store.begin() as conn:
            if entered:
                await conn.execute(sa.insert(segment_members).values(
                    segment=segment, user_id=uid, entered_at=now, evaluated_at=now))
            else:
                await conn.execute(sa.delete(segment_members).where(
                    sm.segment == segment, sm.user_id == uid))
            res = await conn.execute(sa.insert(segment_changes).values(
                segment=segment, user_id=uid, entered=entered, at=now))
            cid = int(res.inserted_primary_key[0])  # type: ignore[index]
        assert self.svc is not None
        await self.svc.membership_changed([MembershipChange(segment, uid, entered, now)])
        self.svc.changes_through(cid)
        await self.settle()

    async def join(self, uid: str, segment: str) -> None:
        await self._change(uid, segment, True)

    async def leave(self, uid: str, segment: str) -> None:
        await self._change(uid, segment, False)

    async def count(self, uid: str) -> int:
        return len(await self.instances(uid))

    async def marker(self, campaign: str) -> bool:
        async with self.store.connect() as conn:
            return (await conn.execute(sa.select(engine_cursors.c.name).where(
                engine_cursors.c.name == marker_name(campaign)))).first() is not None


@pytest.fixture
def h(store: Store, tmp_path: Path) -> Recorded:
    return Recorded(store, tmp_path)


def hold_app(flow: Flow = onboarding, *, on_pause: str = "hold", reentry: bool = False,
             behavior: str = "static") -> Segflow:
    app = make_app("onboarding", flow, exclude=("vip",), reentry=reentry, behavior=behavior)
    c = app.campaigns["onboarding"]
    app.campaigns["onboarding"] = type(c)(**{**c.__dict__, "on_pause": on_pause})
    return app


async def _users(h: Recorded, *uids: str) -> None:
    for u in uids:
        await h.user(u)


async def test_who_joined_while_paused_enters_on_resume_once_and_exclusions_hold(
        h: Recorded) -> None:
    app = hold_app()
    await _users(h, "ann", "bob", "cy", "dee", "ed")
    async with h.running(app) as svc:
        await h.join("ann", "seg")  # entered while it ran
        await h.join("ed", "vip")
        await h.join("ed", "seg")  # excluded
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        await h.join("bob", "seg")  # joins while paused: held
        await h.join("cy", "seg")
        await h.leave("cy", "seg")  # joined and left again: not held
        await h.join("dee", "vip")
        await h.join("dee", "seg")  # excluded
        await h.leave("ed", "vip")  # no longer excluded: held
        await h.join("ann", "vip")
        await h.leave("ann", "vip")  # already entered this static campaign: not held
        await svc._count_waiting()
        assert svc.statistics().waiting_entries == {"onboarding": 2}
        assert await waiting_entries(h.store, app) == {"onboarding": 2}
        assert [await h.count(u) for u in ("bob", "ed")] == [0, 0]
        reply = await svc.k.actions["campaign.resume"]({"campaign": "onboarding"})
        assert reply == {"campaign": "onboarding", "paused": False, "held_entered": 2}
        await h.settle()
        assert not await h.marker("onboarding")
        assert svc.statistics().waiting_entries == {}
        # paused and resumed again: nobody enters twice
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        reply = await svc.k.actions["campaign.resume"]({"campaign": "onboarding"})
        assert reply["held_entered"] == 0  # type: ignore[index]
    assert [await h.count(u) for u in ("ann", "bob", "cy", "dee", "ed")] == [1, 1, 0, 0, 1]
    assert await h.sent("bob") == [("welcome", 0)]


async def test_on_pause_skip_keeps_the_entries_out(h: Recorded) -> None:
    app = hold_app(on_pause="skip")
    await _users(h, "bob")
    async with h.running(app) as svc:
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        await h.join("bob", "seg")
        await svc._count_waiting()
        assert svc.statistics().waiting_entries == {}
        assert not await h.marker("onboarding")
        reply = await svc.k.actions["campaign.resume"]({"campaign": "onboarding"})
        assert reply["held_entered"] == 0  # type: ignore[index]
    assert await h.count("bob") == 0


async def test_a_resume_cut_short_by_a_crash_is_finished_at_start_and_never_doubles(
        h: Recorded) -> None:
    app = hold_app(reentry=True)
    await _users(h, "bob", "cy")
    async with h.running(app) as svc:
        await h.join("cy", "seg")
        await h.advance(7 * DAY)  # cy's first run completes
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        await h.join("bob", "seg")
        await h.leave("cy", "seg")
        await h.join("cy", "seg")  # re-entered a reentry campaign while paused: held
    # kill -9 right after the resume cleared the paused flag: the marker is still there
    async with h.store.begin() as conn:
        await conn.execute(sa.update(campaign_settings).values(paused=False))
    assert await h.marker("onboarding")
    async with h.running(app):
        pass
    assert not await h.marker("onboarding")
    assert [await h.count(u) for u in ("bob", "cy")] == [1, 2]
    # kill -9 after the entries committed but before the marker went: the sweep runs
    # again at start and enters nobody twice
    async with h.store.begin() as conn:
        await conn.execute(sa.insert(engine_cursors).values(
            name=marker_name("onboarding"), last_event_id=0, updated_at=h.clock.now()))
    async with h.running(app):
        pass
    assert not await h.marker("onboarding")
    assert [await h.count(u) for u in ("bob", "cy")] == [1, 2]


async def test_paused_again_mid_resume_keeps_the_older_marker_and_the_held_entries(
        h: Recorded) -> None:
    app = hold_app()
    await _users(h, "bob", "cy")
    async with h.running(app) as svc:
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        await h.join("bob", "seg")
        async with h.store.connect() as conn:
            first = (await conn.execute(sa.select(engine_cursors.c.last_event_id).where(
                engine_cursors.c.name == marker_name("onboarding")))).scalar_one()
        # the sweep finds the campaign paused again: it stops, the marker stays
        assert await svc._release_held(app.campaigns["onboarding"]) == 0
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})  # again
        await h.join("cy", "seg")
        async with h.store.connect() as conn:
            again = (await conn.execute(sa.select(engine_cursors.c.last_event_id).where(
                engine_cursors.c.name == marker_name("onboarding")))).scalar_one()
        assert again == first
        reply = await svc.k.actions["campaign.resume"]({"campaign": "onboarding"})
        assert reply["held_entered"] == 2  # type: ignore[index]
    assert [await h.count(u) for u in ("bob", "cy")] == [1, 1]


def test_on_pause_is_validated_naming_the_file_and_line() -> None:
    app = Segflow()
    with pytest.raises(AppError, match=r"test_flow_holds\.py:\d+: campaign 'c': on_pause "
                                       r"must be 'hold' or 'skip', not 'later'"):
        app.campaign("c", segments=["s"], on_pause="later")  # type: ignore[arg-type]


@pytest.mark.usefixtures("restore_logging")  # cli.main configures logging
def test_segflowd_check_reports_a_bad_on_pause_with_file_and_line(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from segflowd.cli.commands import main

    (tmp_path / "templates").mkdir()
    (tmp_path / "flows.py").write_text(
        "from segflowd import Segflow\napp = Segflow()\n"
        'app.segment("s", sql="SELECT id FROM users")\n\n'
        '@app.campaign("c", segments=["s"], on_pause="later")\n'
        "def c(ctx, rt):\n    yield rt.wait(days=1)\n")
    config = tmp_path / "segflow.toml"
    config.write_text(f'[daemon]\napp = "flows.py:app"\n[store]\nurl = "{sqlite_url}"\n'
                      '[providers.outbox]\nplugin = "outbox"\npath = "var/outbox"\n')
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr()
    assert (f"{tmp_path / 'flows.py'}:5: campaign 'c': on_pause must be 'hold' or 'skip', "
            "not 'later'") in out.out + out.err


def two_waits(ctx: Any, rt: Any) -> Generator[object, object, object]:
    yield rt.wait(days=30)
    yield rt.send_email("late")


async def test_instance_wake_fires_the_wait_now_as_its_timer_would(h: Recorded) -> None:
    app = make_app("cart", awaiting)
    await _users(h, "fay", "gus")
    async with h.running(app) as svc:
        await h.join("fay", "seg")
        [inst] = await h.instances("fay")
        assert inst.status == "waiting"
        reply = await svc.k.actions["instance.wake"]({"instance": inst.id})
        assert reply == {"instance": inst.id, "woken": True, "wait": "event purchase"}
        await h.settle()
        assert await h.sent("fay") == [("nudge", 0)]  # the timeout's branch, at once
        with pytest.raises(FlowError, match=f"instance {inst.id} is completed, not waiting"):
            await svc.k.actions["instance.wake"]({"instance": inst.id})
        with pytest.raises(FlowError, match="no flow instance 999999"):
            await svc.k.actions["instance.wake"]({"instance": 999999})
        await h.advance(3 * DAY)  # the old timeout finds nothing left to fire
    assert await h.sent("fay") == [("nudge", 0)]
    async with h.store.connect() as conn:
        results = [r[0] for r in await conn.execute(
            sa.select(flow_journal.c.result).where(flow_journal.c.instance_id == inst.id)
            .order_by(flow_journal.c.seq))]
    assert results[0] == {"value": None}  # journaled as the timeout is


async def test_a_wake_survives_a_crash_before_its_step(h: Recorded) -> None:
    app = make_app("slow", two_waits)
    await _users(h, "hal")
    async with h.running(app):
        await h.join("hal", "seg")
    [inst] = await h.instances("hal")
    # what instance.wake commits, with the crash before the step ran
    async with h.store.begin() as conn:
        await conn.execute(sa.update(flow_instances).values(wake_at=h.clock.now()))
    async with h.running(app):
        await h.advance(1)
    assert await h.sent("hal") == [("late", 0)]
    assert (await h.instances("hal"))[0].id == inst.id


async def test_a_paused_campaigns_wait_is_not_woken(h: Recorded) -> None:
    app = make_app("slow", two_waits)
    await _users(h, "ida")
    async with h.running(app) as svc:
        await h.join("ida", "seg")
        [inst] = await h.instances("ida")
        await svc.k.actions["campaign.pause"]({"campaign": "slow"})
        with pytest.raises(FlowError, match="is paused; resume it first"):
            await svc.k.actions["instance.wake"]({"instance": inst.id})
        await h.advance(1)
    assert await h.sent("ida") == []


async def test_campaign_rows_and_segflowd_status_show_the_waiting_entries(
        h: Recorded) -> None:
    from segflowd.cli.commands import _parser
    from segflowd.cli.control import format_status
    from segflowd.control import queries

    app = hold_app()
    await _users(h, "bob", "cy")
    async with h.running(app) as svc:
        await svc.k.actions["campaign.pause"]({"campaign": "onboarding"})
        await h.join("bob", "seg")
        await h.join("cy", "seg")
        [row] = await queries.campaigns(h.store, app)
        assert (row["paused"], row["waiting_entries"]) == (True, 2)
        await svc._count_waiting()
        text = format_status({"stats": {"flows": {
            "waiting_entries": dict(svc.statistics().waiting_entries)}}})
        assert "paused: campaign onboarding: 2 entries waiting" in text
        await svc.k.actions["campaign.resume"]({"campaign": "onboarding"})
        [row] = await queries.campaigns(h.store, app)
        assert (row["paused"], row["waiting_entries"]) == (False, 0)
    args = _parser().parse_args(["wake", "7"])
    assert (args.action, args.instance_id) == ("instance.wake", 7)
