"""Reading the flows statically (``segflowd check``): the commands' literal arguments."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from segflowd.app import Segflow
from segflowd.cli.flowscan import scan_app

REMINDER = "reminder"
SQL = "SELECT true AS result FROM users WHERE id = '<%= profile_id %>'"


def flow(ctx: Any, runtime: Any) -> Generator[object, object, object]:
    yield runtime.send_email("welcome", attempt=1, plan=ctx.user.get("plan"))
    yield runtime.send_email(REMINDER, **dict(ctx.user))
    yield runtime.send_email(ctx.user["template"])
    if (yield runtime.condition("crm", SQL, profile_id=ctx.user_id)):
        yield runtime.opened("welcome")
    yield ctx.other.send_email("not-rt")  # not the runtime parameter: not a command


def test_scan_finds_each_command_its_literals_and_its_line() -> None:
    app = Segflow(templates="templates")
    app.segment("seg", sql="SELECT id FROM users")
    app.campaign("c", segments=["seg"])(flow)
    calls = scan_app(app)
    assert [(c.command, c.name) for c in calls] == [
        ("send_email", "welcome"), ("send_email", "reminder"), ("send_email", None),
        ("condition", "crm"), ("opened", "welcome")]
    first = calls[0]
    assert first.where == f"{__file__}:{flow.__code__.co_firstlineno + 1}"
    assert first.keywords == {"attempt": 1, "plan": None}  # a computed value is None
    assert not first.open_keywords
    assert calls[1].open_keywords  # **mapping: keywords not known statically
    assert calls[3].sql == SQL
    assert calls[3].keywords == {"profile_id": None}
