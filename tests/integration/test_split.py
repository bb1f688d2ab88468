"""``rt.split``: a user's variant is decided once per campaign, user and experiment, stored
in ``flow_splits`` and journaled, so restarts and replays keep it (even with the row
gone); new weights steer only users not yet assigned; a holdout is a branch that sends
nothing; every send after a split records the variant in ``messages.variant``; bad
weights fail the instance saying why, and literal ones are ``segflowd check`` problems
naming file and line. On SQLite and MariaDB, and through Simulation."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_flows import DAY, Harness, make_app

from segflowd.cli.commands import main
from segflowd.flows.split import pick
from segflowd.schema import flow_journal, flow_splits, messages
from segflowd.store import Store
from segflowd.testing import Simulation

pytestmark = pytest.mark.anyio

CAMPAIGN = "subjects"
USERS = [f"u{i}" for i in range(12)]
WEIGHTS: dict[str, float] = {"a": 50, "b": 50}  # read by the flows at each split


def subjects(ctx: Any, rt: Any) -> Generator[object, object, None]:
    yield rt.send_email("intro")
    variant = yield rt.split("subject-test", WEIGHTS)
    yield rt.send_email(f"first-{variant}")
    yield rt.wait(days=1)
    yield rt.send_email(f"later-{variant}")
    again = yield rt.split("subject-test", WEIGHTS)
    yield rt.send_email(f"again-{again}")


@pytest.fixture
def h(store: Store, tmp_path: Path) -> Harness:
    return Harness(store, tmp_path)


@pytest.fixture(autouse=True)
def weights() -> Generator[dict[str, float], None, None]:
    saved = dict(WEIGHTS)
    yield WEIGHTS
    WEIGHTS.clear()
    WEIGHTS.update(saved)


async def sends(store: Store, uid: str) -> list[tuple[str, str | None]]:
    """(template, variant) of the user's messages, in order."""
    m = messages.c
    async with store.connect() as conn:
        return [(r.template, r.variant) for r in await conn.execute(
            sa.select(m.template, m.variant).where(m.user_id == uid).order_by(m.id))]


async def assigned(store: Store) -> dict[str, str]:
    fs = flow_splits.c
    async with store.connect() as conn:
        return {str(r.user_id): str(r.variant) for r in await conn.execute(
            sa.select(fs.user_id, fs.variant).where(
                fs.campaign == CAMPAIGN, fs.name == "subject-test"))}


async def start(h: Harness, uids: list[str]) -> None:
    for uid in uids:
        await h.user(uid)
        await h.join(uid, "seg")


async def test_a_variant_is_decided_once_and_kept_across_restarts_and_replays(
        h: Harness) -> None:
    """Each user's variant is the hash's pick, stored once; sends after the split carry
    it. After a restart, with one user's row deleted and another's changed, the replayed
    flows still get their journaled variant, and nothing is decided again."""
    app = make_app(CAMPAIGN, subjects)
    expected = {u: pick(CAMPAIGN, u, "subject-test", {"a": 50, "b": 50}) for u in USERS}
    assert set(expected.values()) == {"a", "b"}  # twelve users fall in both variants
    async with h.running(app):
        await start(h, USERS)
        assert await assigned(h.store) == expected
        for u in USERS:
            v = expected[u]
            assert await sends(h.store, u) == [("intro", None), (f"first-{v}", v)]
    fs = flow_splits.c
    flipped = {"a": "b", "b": "a"}
    async with h.store.begin() as conn:
        await conn.execute(sa.delete(flow_splits).where(fs.user_id == "u0"))
        await conn.execute(sa.update(flow_splits).where(fs.user_id == "u1").values(
            variant=flipped[expected["u1"]]))
    async with h.running(app):  # a restart: every instance replays its journal
        await h.advance(2 * DAY)
    for u in USERS:
        v = expected[u]
        got = await sends(h.store, u)
        assert got[:3] == [("intro", None), (f"first-{v}", v), (f"later-{v}", v)]
        (inst,) = await h.instances(u)
        assert inst.status == "completed"
    # The second split is live: u0 (row deleted) is decided again by the same hash, and
    # u1 gets what the store now holds; the first split's replay changed neither.
    assert (await sends(h.store, "u0"))[3] == (f"again-{expected['u0']}", expected["u0"])
    u1 = flipped[expected["u1"]]
    assert (await sends(h.store, "u1"))[3] == (f"again-{u1}", u1)
    assert (await assigned(h.store))["u0"] == expected["u0"]
    fj = flow_journal.c
    async with h.store.connect() as conn:
        results = list((await conn.execute(sa.select(fj.result).where(
            fj.kind == "split").order_by(fj.instance_id, fj.seq))).scalars())
    assert len(results) == 2 * len(USERS)
    assert all(isinstance(r, dict) and r.get("value") in ("a", "b") for r in results)


async def test_new_weights_change_only_users_not_yet_assigned(h: Harness,
                                                              weights: dict[str, float]
                                                              ) -> None:
    """Weights move to all-"b" while early users wait between their two splits: their
    in-flight flows replay (the split matches by name, whatever its weights) and their
    second split keeps "a"; a user who arrives after the change gets "b"."""
    weights.update(a=100, b=0)
    app = make_app(CAMPAIGN, subjects)
    async with h.running(app):
        await start(h, ["early1", "early2"])
    weights.update(a=0, b=100)
    async with h.running(app):
        await start(h, ["late"])
        await h.advance(2 * DAY)
    for u in ("early1", "early2"):
        assert await sends(h.store, u) == [
            ("intro", None), ("first-a", "a"), ("later-a", "a"), ("again-a", "a")]
    assert await sends(h.store, "late") == [
        ("intro", None), ("first-b", "b"), ("later-b", "b"), ("again-b", "b")]
    assert await assigned(h.store) == {"early1": "a", "early2": "a", "late": "b"}


def with_holdout(ctx: Any, rt: Any) -> Generator[object, object, None]:
    if (yield rt.split("offer", {"send": 50, "holdout": 50})) == "holdout":
        return
    yield rt.send_email("offer")
    yield rt.webhook("https://crm.example.com/offered", json={"user": ctx.user_id})


async def test_a_holdout_branch_sends_nothing(h: Harness) -> None:
    app = make_app("offers", with_holdout)
    people = [f"p{i}" for i in range(10)]
    drawn = {u: pick("offers", u, "offer", {"send": 50, "holdout": 50}) for u in people}
    assert set(drawn.values()) == {"send", "holdout"}
    async with h.running(app):
        await start(h, people)
    m = messages.c
    for u in people:
        async with h.store.connect() as conn:
            rows = [(r.channel, r.template, r.variant) for r in await conn.execute(
                sa.select(m.channel, m.template, m.variant).where(m.user_id == u)
                .order_by(m.id))]
        if drawn[u] == "holdout":
            assert rows == []
            (inst,) = await h.instances(u)
            assert inst.status == "completed"
        else:  # the webhook call carries the variant too
            assert rows == [("email", "offer", "send"), ("webhook", "webhook", "send")]


def zero_weights(ctx: Any, rt: Any) -> Generator[object, object, None]:
    yield rt.send_email("before")
    yield rt.split("broken", {"a": 0, "b": 0})
    yield rt.send_email("never")


def not_a_dict(ctx: Any, rt: Any) -> Generator[object, object, None]:
    yield rt.split("broken", ["a", "b"])
    yield rt.send_email("never")


@pytest.mark.parametrize(("flow", "error"), [
    (zero_weights, "split('broken') weights must sum to more than 0"),
    (not_a_dict, "split('broken') weights must be a dict of variant name to weight"),
])
async def test_bad_weights_fail_the_instance_saying_why(h: Harness, flow: Any,
                                                        error: str) -> None:
    app = make_app("broken", flow)
    async with h.running(app):
        await start(h, ["ann"])
    (inst,) = await h.instances("ann")
    assert inst.status == "failed"
    assert error in inst.error
    assert [t for t, _ in await h.sent("ann")] == (["before"] if flow is zero_weights else [])
    assert await assigned(h.store) == {}


CHECKED = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.segment("everyone", sql="SELECT id FROM users")
app.template("mail", subject="mail", html="plain.html")
EVEN = {"a": 1, "b": 1}

@app.campaign("experiments", segments=["everyone"])
def experiments(ctx, rt):
    yield rt.split("fine", {"send": 90, "holdout": 10})
    yield rt.split("all-zero", {"a": 0, "b": 0})
    yield rt.split("negative", weights={"a": -1, "b": 5})
    yield rt.split("computed", EVEN)
    yield rt.split("from-user", ctx.user.get("weights"))
    yield rt.send_email("mail")
"""


@pytest.mark.usefixtures("restore_logging")
def test_check_names_each_bad_literal_split_with_file_and_line(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "plain.html").write_text("<p>Hi</p>")
    (tmp_path / "flows.py").write_text(CHECKED)
    config = tmp_path / "segflow.toml"
    config.write_text(f'[daemon]\napp = "flows.py:app"\n[store]\nurl = "{sqlite_url}"\n'
                      '[providers.outbox]\nplugin = "outbox"\npath = "var/outbox"\n')
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    flows = tmp_path / "flows.py"
    assert (f"{flows}:11: rt.split('all-zero') weights must sum to more than 0, "
            "not {'a': 0, 'b': 0}") in out
    assert f"{flows}:12: rt.split('negative') weight of 'a' must be a finite number" in out
    for line in (10, 13, 14):
        assert f"{flows}:{line}:" not in out
    assert "check: 2 problems" in out


SIMULATED = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.segment("everyone", sql="SELECT id FROM users")
for name in ("subject-a", "subject-b"):
    app.template(name, subject=name, html="plain.html")

@app.campaign("launch", segments=["everyone"])
def launch(ctx, rt):
    variant = yield rt.split("subject-test", {"a": 50, "b": 50})
    yield rt.send_email(f"subject-{variant}")
"""


def test_a_simulation_runs_the_split_like_the_daemon(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "plain.html").write_text("<p>Hi</p>")
    (tmp_path / "app.py").write_text(SIMULATED)
    people = [f"s{i}" for i in range(8)]
    with Simulation(f"{tmp_path / 'app.py'}:app", start="2026-03-01T09:00:00Z") as sim:
        for u in people:
            sim.user(u, email=f"{u}@example.com")
        sim.advance(hours=1)
        for u in people:
            v = pick("launch", u, "subject-test", {"a": 50, "b": 50})
            assert [m.template for m in sim.sent(u)] == [f"subject-{v}"]
