"""Frequency caps ([email] / [sms] max_marketing): over a cap, marketing waits for the next
allowed time or is dropped; transactional mail is never counted nor held; each channel
counts apart. Through Simulation (a campaign's days in simulated time), and through the
delivery service on both stores (the gate's query, a batch with several for one user)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa
from delivery_harness import NOW, ScriptedProvider, add_user, make_kernel, message_row, service

from segflowd.delivery.outbox import enqueue
from segflowd.schema import messages
from segflowd.store import Store
from segflowd.testing import Simulation

START = dt.datetime(2026, 3, 1, 9, 0)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)

APP = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.segment("everyone", sql="SELECT id FROM users")
for name in ("one", "two", "three", "four", "receipt"):
    app.template(name, subject=name, html="plain.html")
app.sms_template("hi", text="Hi {{ user.name }}")
app.sms_template("again", text="Again, {{ user.name }}")
app.transaction("receipt", event="purchase", template="receipt")

@app.campaign("drip", segments=["everyone"])
def drip(ctx, rt):
    yield rt.send_email("one")
    yield rt.wait(hours=3)
    yield rt.send_email("two")
    yield rt.wait(hours=3)
    yield rt.send_email("three")
    yield rt.wait(hours=3)
    yield rt.send_email("four")

@app.campaign("texts", segments=["everyone"])
def texts(ctx, rt):
    if ctx.user.get("phone"):
        yield rt.send_sms("hi")
        yield rt.send_sms("again")
"""


@pytest.fixture
def app_spec(tmp_path: Path) -> str:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "plain.html").write_text("<p>Hi {{ user.name }}</p>")
    (tmp_path / "app.py").write_text(APP)
    return f"{tmp_path / 'app.py'}:app"


def sent(sim: Simulation, user: str, channel: str = "email") -> list[tuple[str, dt.datetime]]:
    return sorted(((m.template, m.at) for m in sim.sent(user) if m.channel == channel),
                  key=lambda x: (x[1], x[0]))


def test_a_cap_defers_the_4th_mail_of_a_day_to_the_next_day(app_spec: str) -> None:
    with Simulation(app_spec, start=START, config={"email": {"max_marketing": "3/day"}}) as sim:
        sim.user("ann", email="ann@example.com", name="Ann")
        sim.advance(days=3)
        # Due at 18:00, the fourth would be the fourth in 24 hours: it waits until the
        # first (09:00) leaves the rolling window, at 09:00 the next day.
        assert sent(sim, "ann") == [("one", START), ("two", START + 3 * HOUR),
                                    ("three", START + 6 * HOUR), ("four", START + DAY)]
        held = [e for e in sim.timeline("ann") if e.kind == "message.held"]
        assert len(held) == 1
        assert held[0].at == START + 9 * HOUR
        assert held[0].detail["error"] == ("frequency cap: 3/day reached; "
                                           "held until 2026-03-02T09:00:00Z")


def test_the_drop_action_suppresses_the_message_with_the_reason(app_spec: str) -> None:
    config = {"email": {"max_marketing": "3/day", "cap_action": "drop"}}
    with Simulation(app_spec, start=START, config=config) as sim:
        sim.user("ann", email="ann@example.com", name="Ann")
        sim.advance(days=3)
        assert [t for t, _ in sent(sim, "ann")] == ["one", "two", "three"]
        dropped = [e for e in sim.timeline("ann") if e.kind == "message.suppressed"]
        assert len(dropped) == 1
        assert dropped[0].at == START + 9 * HOUR
        assert dropped[0].detail["template"] == "four"
        assert dropped[0].detail["error"] == "frequency cap: 3/day reached"


def test_transactional_mail_is_exempt_and_not_counted(app_spec: str) -> None:
    with Simulation(app_spec, start=START, config={"email": {"max_marketing": "1/day"}}) as sim:
        sim.user("ann", email="ann@example.com", name="Ann")
        sim.event("ann", "purchase")  # a receipt at 09:00, beside "one"
        sim.advance(hours=1)
        sim.event("ann", "purchase")  # the cap is reached: a receipt still goes at once
        sim.advance(days=4)
        out = sent(sim, "ann")
        assert [at for t, at in out if t == "receipt"] == [START, START + HOUR]
        # One marketing mail a day, each held until the one before is 24 hours old; the
        # receipts took none of the allowance.
        assert [(t, at) for t, at in out if t != "receipt"] == [
            ("one", START), ("two", START + DAY), ("three", START + 2 * DAY),
            ("four", START + 3 * DAY)]


def test_sms_is_counted_apart_from_email(app_spec: str) -> None:
    config = {"email": {"max_marketing": "3/day"}, "sms": {"max_marketing": "1/day"}}
    with Simulation(app_spec, start=START, config=config) as sim:
        sim.user("ann", email="ann@example.com", name="Ann", phone="+44 7911 123456")
        sim.advance(days=3)
        # Three mails the same day do not touch the SMS allowance, and the second SMS
        # (held a day) does not touch the mail's.
        assert sent(sim, "ann", "sms") == [("hi", START), ("again", START + DAY)]
        assert sent(sim, "ann") == [("one", START), ("two", START + 3 * HOUR),
                                    ("three", START + 6 * HOUR), ("four", START + DAY)]


# -- the delivery service on both stores -----------------------------------------------------

async def _queue(store: Store, kind: str, n: int = 1, user: str = "u1") -> list[int]:
    ids = []
    async with store.begin() as conn:
        for _ in range(n):
            mid = await enqueue(conn, kind=kind,  # type: ignore[arg-type]
                                template="receipt" if kind == "transaction" else "welcome",
                                now=NOW, user_id=user, dedupe_key=None, to_address=None,
                                data={"plan": "pro", "amount": "$1"},
                                campaign="drip" if kind == "campaign" else None)
            assert mid is not None
            ids.append(mid)
    return ids


@pytest.mark.anyio
async def test_one_batch_with_many_for_a_user_sends_up_to_the_caps(store: Store,
                                                                    tmp_path: Path) -> None:
    """The gate counts the batch's own messages, a past message left ``unknown`` (it may
    have gone out), and holds the rest until the oldest counted leaves the window."""
    setup = make_kernel(store, tmp_path, email_extra='max_marketing = "3/day, 4/week"\n')
    await add_user(store, "u1", "ann@example.org", name="Ann")
    await add_user(store, "u2", "bob@example.org", name="Bob")
    # Two days ago a send was cut by a crash: it counts in the week, not in the day.
    old, *_ = await _queue(store, "broadcast")
    async with store.begin() as conn:
        await conn.execute(sa.update(messages).where(messages.c.id == old).values(
            status="unknown", updated_at=NOW - 2 * DAY))
    marketing = await _queue(store, "campaign", 5)
    receipt, *_ = await _queue(store, "transaction")
    bobs = await _queue(store, "campaign", 2, user="u2")
    provider = ScriptedProvider()
    svc = service(setup, provider)
    assert await svc.run_once() == 8
    assert sorted(m.id for m in provider.sent) == sorted([*marketing[:3], receipt, *bobs])
    for mid in marketing[3:]:
        row = await message_row(store, mid)
        assert row["status"] == "queued"
        assert row["attempts"] == 0  # the attempt is given back
        # 4/week: the unknown one and three today; it leaves the week in five days.
        assert row["next_attempt_at"] == NOW + 5 * DAY
        assert row["last_error"].startswith("frequency cap: 4/week reached; held until ")
    setup.clock.set(NOW + 5 * DAY - dt.timedelta(seconds=1))
    assert await svc.run_once() == 0
    setup.clock.set(NOW + 5 * DAY)
    provider.sent.clear()
    await svc.run_once()
    # One more fits the week (three sent five days ago, none today): the last waits again.
    assert [m.id for m in provider.sent] == [marketing[3]]
    row = await message_row(store, marketing[4])
    assert row["status"] == "queued"
    assert row["next_attempt_at"] == NOW + 7 * DAY
