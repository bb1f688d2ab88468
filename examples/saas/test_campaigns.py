"""The example app's campaigns, tested the way a team tests its own: with Simulation.

Each test runs the daemon's real engines on a temporary store under a virtual clock, so
weeks of a campaign take well under a second. Run them with ``pytest examples/saas``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from flows import app  # this folder is on sys.path when pytest collects the file

from segflowd.testing import SentMessage, Simulation

START = "2026-03-01T09:00:00Z"
T0 = dt.datetime(2026, 3, 1, 9, 0)
LONG_AGO = "2026-01-01T00:00:00Z"  # a last login that makes a user inactive at START


def days(m: SentMessage) -> float:
    return (m.at - T0).total_seconds() / 86400


@pytest.fixture
def sim() -> Iterator[Simulation]:
    with Simulation(app, start=START) as s:
        yield s


def of(sim: Simulation, user: str, campaign: str) -> list[tuple[str, float]]:
    return [(m.template, days(m)) for m in sim.sent(user) if m.campaign == campaign]


# -- onboarding ----------------------------------------------------------------------------

def test_onboarding_reminds_a_new_user_who_has_not_completed_their_profile(
        sim: Simulation) -> None:
    sim.user("ann", email="ann@example.com", name="Ann")
    sim.advance(days=10)
    assert of(sim, "ann", "onboarding") == [
        ("welcome", 0), ("complete-profile-reminder", 1), ("feature-highlights", 4)]
    welcome = sim.sent("ann")[0]
    assert welcome.subject == "Welcome Ann!"
    assert welcome.to == "ann@example.com"
    assert "Ann" in welcome.html
    assert "Ann" in welcome.text
    kinds = [e.kind for e in sim.timeline("ann") if e.detail.get("campaign") == "onboarding"]
    assert kinds[0] == "flow.started"
    assert kinds[-1] == "flow.completed"


def test_onboarding_skips_the_reminder_for_a_completed_profile(sim: Simulation) -> None:
    sim.user("bob", email="bob@example.com", name="Bob", profile_completed=True)
    sim.advance(days=10)
    assert of(sim, "bob", "onboarding") == [("welcome", 0), ("feature-highlights", 1)]


def test_onboarding_reads_the_profile_when_the_flow_gets_there(sim: Simulation) -> None:
    """Completing the profile before the first day is over takes the short branch."""
    sim.user("cat", email="cat@example.com", name="Cat")
    sim.advance(hours=12)
    sim.user("cat", profile_completed=True)
    sim.advance(days=5)
    assert of(sim, "cat", "onboarding") == [("welcome", 0), ("feature-highlights", 1)]


# -- winback -------------------------------------------------------------------------------

def test_winback_enters_an_inactive_user_and_sends_three_times(sim: Simulation) -> None:
    sim.user("ann", email="ann@example.com", name="Ann")
    sim.event("ann", "login", at=LONG_AGO)
    entered = [e.kind for e in sim.timeline("ann")
               if e.detail.get("segment") == "inactive-users"
               or e.detail.get("campaign") == "winback"]
    assert entered[:2] == ["segment.entered", "flow.started"]
    sim.advance(days=40)
    assert of(sim, "ann", "winback") == [("we-miss-you", 0), ("we-miss-you", 1),
                                         ("we-miss-you", 3)]
    assert {m.subject for m in sim.sent("ann") if m.campaign == "winback"} == {
        "We miss you, Ann"}


def test_winback_ends_the_moment_the_user_logs_in_again(sim: Simulation) -> None:
    sim.user("ann", email="ann@example.com", name="Ann")
    sim.event("ann", "login", at=LONG_AGO)
    sim.advance(days=2)
    sim.event("ann", "login")  # back: leaves inactive-users, and the dynamic flow ends
    assert sim.timeline("ann")[-1].kind == "flow.exited"
    assert sim.timeline("ann")[-1].detail["campaign"] == "winback"
    sim.advance(days=20)
    assert [t for t, _ in of(sim, "ann", "winback")] == ["we-miss-you"] * 2


def test_winback_waits_until_thirty_days_after_the_last_login(sim: Simulation) -> None:
    sim.user("dan", email="dan@example.com", name="Dan")
    sim.event("dan", "login")
    sim.advance(days=29)
    assert of(sim, "dan", "winback") == []
    sim.advance(days=2)
    # the inactive-users refresh (every 15 minutes) finds him 30 days after the login
    first = next(m for m in sim.sent("dan") if m.campaign == "winback")
    assert T0 + dt.timedelta(days=30) <= first.at <= T0 + dt.timedelta(days=30, minutes=15)


def test_winback_leaves_big_spenders_alone(sim: Simulation) -> None:
    sim.user("eve", email="eve@example.com", name="Eve")
    sim.event("eve", "purchase", at=LONG_AGO, amount=1500)
    sim.event("eve", "login", at=LONG_AGO)
    sim.advance(days=10)
    assert of(sim, "eve", "winback") == []


# -- transactions --------------------------------------------------------------------------

def test_password_reset_is_sent_at_once_with_the_link_of_the_event(sim: Simulation) -> None:
    sim.user("ann", email="ann@example.com", name="Ann")
    sim.advance(hours=3)
    sim.event("ann", "reset_password_requested", token="t0k3n")
    reset = [m for m in sim.sent("ann") if m.template == "password-reset"]
    assert len(reset) == 1
    assert reset[0].subject == "Reset your password"
    assert reset[0].at == T0 + dt.timedelta(hours=3)
    assert reset[0].kind == "transaction"
    assert "token=t0k3n" in reset[0].html
