"""Snapshots of segflow-tui's main screens, on fixed data (segflow_tui.testing.FixedBackend).

Regenerate after a deliberate change with ``pytest tests/unit/test_tui_snapshots.py
--snapshot-update`` and review the SVGs (``__snapshots__/``) before committing them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import pytest
from textual.pilot import Pilot

from segflow_tui.app import SegflowTUI
from segflow_tui.testing import EVENTS, FixedBackend

SIZE = (130, 36)
SnapCompare = Callable[..., bool]


def make_app() -> SegflowTUI:
    # No polling after the first load and a fast feed: nothing changes while we look.
    return SegflowTUI(FixedBackend(), poll_interval=3600, feed_interval=0.01)


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
    ("help", ("question_mark",), ""),
    ("confirm_pause", ("2", "p"), ""),
    ("action_dialog", ("a",), ""),
]


@pytest.mark.parametrize(("screen", "keys", "typed"), SCREENS, ids=[s[0] for s in SCREENS])
def test_screen_matches_its_snapshot(snap_compare: SnapCompare, screen: str,
                                     keys: tuple[str, ...], typed: str) -> None:
    """Each main screen renders the fixed data exactly as reviewed."""
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=steps(*keys, typed=typed))
