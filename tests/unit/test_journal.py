"""Replay: journaled results fed back, ctx reads answered from the journal, divergence."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from segflowd.app import Segflow
from segflowd.errors import FlowError
from segflowd.flows.journal import Divergence, JournalRow, Replay
from segflowd.flows.runtime import Command, Runtime

Gen = Generator[object, object, object]


def campaign(flow: Any) -> Any:
    app = Segflow()
    app.campaign("c", segments=["s"])(flow)
    return app.campaigns["c"]


def run_live(flow: Any, attrs: dict[str, object], results: list[object]
             ) -> tuple[list[JournalRow], Replay]:
    """Run a flow live, journaling each command with the given results in turn."""
    def live(key: str) -> tuple[bool, object]:
        if key == "user":
            return True, attrs
        return key[5:] in attrs, attrs.get(key[5:])

    r = Replay(campaign(flow), "u", [], live)
    r.replay()
    rows: list[JournalRow] = []
    value: object = None
    for i in range(len(results) + 1):
        cmd = r.resume(value)
        if cmd is None:
            break
        rows.append(JournalRow(i, cmd.kind, cmd.name, cmd.hash,
                               {"value": results[i]} if i < len(results) else None,
                               r.take_reads()))
        value = results[i] if i < len(results) else None
    return rows, r


def counting(counter: list[int]) -> Any:
    def flow(ctx: Any, rt: Runtime) -> Gen:
        for i in range(1000):
            counter.append(i)
            yield rt.wait(seconds=i + 1)
    return flow


def test_replay_walks_the_journal_once_so_its_cost_is_linear() -> None:
    counter: list[int] = []
    rows, _ = run_live(counting(counter), {}, [None] * 999)
    assert len(rows) == 1000
    counter.clear()
    r = Replay(campaign(counting(counter)), "u", rows, live=None)
    r.replay()
    assert len(counter) == 1000  # one generator step per row, never a restart per row


def test_replay_answers_ctx_reads_from_the_journal_not_fresh_data() -> None:
    def flow(ctx: Any, rt: Runtime) -> Gen:
        plan = ctx.user["plan"]
        yield rt.wait(days=1)
        yield rt.send_email(f"plan-{plan}")

    rows, _ = run_live(flow, {"plan": "free"}, [])
    assert rows[0].reads == {"user.plan": [True, "free"]}

    def fresh(key: str) -> tuple[bool, object]:
        return True, "pro"

    r = Replay(campaign(flow), "u", rows[:1], fresh)
    r.replay()
    cmd = r.resume(None)
    assert cmd == Command("send_email", "plan-free", {})


def test_a_different_command_at_the_same_position_is_a_divergence() -> None:
    def old(ctx: Any, rt: Runtime) -> Gen:
        yield rt.send_email("a")
        yield rt.wait(days=1)

    def new(ctx: Any, rt: Runtime) -> Gen:
        yield rt.send_email("b")
        yield rt.wait(days=1)

    rows, _ = run_live(old, {}, [None])
    with pytest.raises(Divergence) as err:
        Replay(campaign(new), "u", rows, live=None).replay()
    assert err.value.seq == 0
    assert "send_email('b')" in err.value.reason


def test_changed_arguments_are_a_divergence() -> None:
    def old(ctx: Any, rt: Runtime) -> Gen:
        yield rt.wait(days=1)

    def new(ctx: Any, rt: Runtime) -> Gen:
        yield rt.wait(days=2)

    rows, _ = run_live(old, {}, [])
    with pytest.raises(Divergence, match="different arguments"):
        Replay(campaign(new), "u", rows, live=None).replay()


def test_a_read_the_journal_never_recorded_is_a_divergence() -> None:
    def old(ctx: Any, rt: Runtime) -> Gen:
        yield rt.wait(days=1)

    def new(ctx: Any, rt: Runtime) -> Gen:
        if ctx.user.get("vip"):
            yield rt.send_email("vip")
        yield rt.wait(days=1)

    rows, _ = run_live(old, {"vip": True}, [])
    with pytest.raises(Divergence, match=r"ctx\.user\.vip"):
        Replay(campaign(new), "u", rows, live=None).replay()


def test_patched_is_false_for_old_journals_and_true_live() -> None:
    def old(ctx: Any, rt: Runtime) -> Gen:
        yield rt.wait(days=1)
        yield rt.send_email("old")

    def new(ctx: Any, rt: Runtime) -> Gen:
        yield rt.wait(days=1)
        if rt.patched("new-mail"):
            yield rt.send_email("new")
        else:
            yield rt.send_email("old")

    rows, _ = run_live(old, {}, [None, None])
    Replay(campaign(new), "u", rows, live=None).replay()  # the old path replays cleanly
    fresh, _ = run_live(new, {}, [None])
    assert [(r.kind, r.name) for r in fresh] == [("wait", None), ("send_email", "new")]


def test_a_journaled_error_is_thrown_into_the_flow() -> None:
    def flow(ctx: Any, rt: Runtime) -> Gen:
        try:
            yield rt.condition("crm", "SELECT 1 AS result")
        except FlowError:
            yield rt.send_email("fallback")

    rows = [JournalRow(0, "condition", "crm", Command(
        "condition", "crm", {"sql": "SELECT 1 AS result", "params": {}}).hash,
        {"error": "boom"}, {})]
    r = Replay(campaign(flow), "u", rows, live=lambda k: (False, None))
    r.replay()
    assert r.resume(None, "boom") == Command("send_email", "fallback", {})


def test_yielding_something_else_than_a_command_is_a_clear_error() -> None:
    def flow(ctx: Any, rt: Runtime) -> Gen:
        yield "send welcome"

    r = Replay(campaign(flow), "u", [], live=lambda k: (False, None))
    r.replay()
    with pytest.raises(FlowError, match="must yield rt commands"):
        r.resume(None)
