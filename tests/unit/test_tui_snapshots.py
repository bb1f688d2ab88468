"""Snapshots of segflow-tui's main screens, on fixed data (segflow_tui.testing.FixedBackend).

Regenerate after a deliberate change with ``pytest tests/unit/test_tui_snapshots.py
--snapshot-update`` and review the SVGs (``__snapshots__/``) before committing them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import pytest
from textual.pilot import Pilot

from segflow_tui.app import SegflowTUI
from segflow_tui.dashboard import PanelView
from segflow_tui.testing import EVENTS, FixedBackend

SIZE = (130, 36)
SnapCompare = Callable[..., bool]


def make_app(*, alarmed: bool = False) -> SegflowTUI:
    # No polling after the first load and a fast feed: nothing changes while we look.
    return SegflowTUI(FixedBackend(alarmed=alarmed), poll_interval=3600, feed_interval=0.01)


def steps(*keys: str, typed: str = "") -> Callable[[Pilot[None]], Awaitable[None]]:
    async def run_before(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, SegflowTUI)
        while app.refreshes < 1 or app.events_seen < len(EVENTS):
            await pilot.pause(0.02)
        await pilot.press(*keys)
        if typed:
            await pilot.press(*typed, "enter")
        await pilot.pause(0.1)
        await pilot.wait_for_scheduled_animations()
    return run_before


SCREENS: Sequence[tuple[str, tuple[str, ...], str]] = [
    ("dashboard", (), ""),
    ("campaigns", ("2",), ""),
    ("campaign_funnel", ("2", "enter"), ""),
    ("activity", ("3",), ""),
    ("segments", ("4",), ""),
    ("user_timeline", ("5",), "u1"),
    ("messages_failures", ("6", "x"), ""),
    ("message_detail", ("6", "x", "enter"), ""),
    ("help", ("question_mark",), ""),
    ("confirm_pause", ("2", "p"), ""),
    ("action_dialog", ("a",), ""),
]


@pytest.mark.parametrize(("screen", "keys", "typed"), SCREENS, ids=[s[0] for s in SCREENS])
def test_screen_matches_its_snapshot(snap_compare: SnapCompare, screen: str,
                                     keys: tuple[str, ...], typed: str) -> None:
    """Each main screen renders the fixed data exactly as reviewed."""
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=steps(*keys, typed=typed))


ALARMED: Sequence[tuple[str, tuple[str, ...]]] = [
    ("dashboard_alarmed", ()),
    ("dashboard_errors", ("e",)),
]


@pytest.mark.parametrize(("screen", "keys"), ALARMED, ids=[s[0] for s in ALARMED])
def test_alarmed_screen_matches_its_snapshot(snap_compare: SnapCompare, screen: str,
                                             keys: tuple[str, ...]) -> None:
    """A daemon past every threshold: each panel warns in red and in words; e: full errors."""
    assert snap_compare(make_app(alarmed=True), terminal_size=SIZE, run_before=steps(*keys))


async def panels_of(app: SegflowTUI) -> dict[str, PanelView]:
    async with app.run_test(size=SIZE) as pilot:
        while app.refreshes < 1:
            await pilot.pause(0.02)
        return {p.key: p for p in app.panels}


@pytest.mark.anyio
async def test_panels_warn_past_their_thresholds_and_only_then() -> None:
    normal = await panels_of(make_app())
    assert {p.subtitle for p in normal.values()} == {"ok"}
    alarmed = await panels_of(make_app(alarmed=True))
    warned = {k for k, p in alarmed.items() if p.subtitle == "WARNING"}
    assert warned == {"store", "outbox", "timers", "failures", "instances", "campaigns"}
    assert alarmed["outbox"].warnings == (
        "depth ≥ 10000", "oldest ≥ 10m", "provider smtp down since 2026-03-01T10:05:00Z")
    assert alarmed["campaigns"].warnings == ("onboarding: 358 failures ≥ 5",)  # winback: 3
