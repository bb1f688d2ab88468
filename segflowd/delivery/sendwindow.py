"""The send-window gate: a campaign's message goes out only inside its ``send_window``.

``app.campaign(..., send_window=("09:00", "18:00", "mon-fri"))`` gives the campaign a
daily window of local time (:class:`~segflowd.localtime.Window`). Each of its messages,
email or SMS, is checked when delivery prepares it, in its user's zone: their
``timezone`` attribute, else ``[daemon] default_timezone``. Outside the window it is
held (queued again, its attempt given back, ``last_error`` saying which window and
zone) until the window next opens; at that instant the window is open, so it goes then.
A ``timezone`` that names no zone is read as the default and counted
(``segflow_timezone_fallbacks_total{where="send_window"}``).

The check is made at send time, not when the flow queued the message: a message that
waited (a provider outage, a frequency cap) is still never sent at night. Only the
campaign's own messages are held: transactional mail, tests and broadcasts are not.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..kernel import Kernel
from ..localtime import Window, count_fallback, default_zone, user_zone

__all__ = ["SendWindowGate", "window_gates"]


class _Open(Protocol):
    """What this gate reads and sets of a prepared message (:class:`~.gates.Open`;
    not imported from there: :mod:`.gates` builds this gate)."""

    row: Mapping[str, Any]  # the messages row: kind, campaign
    user: dict[str, Any]  # the user's attributes: timezone
    status: str | None
    error: str | None
    hold_until: dt.datetime | None


def window_gates(k: Kernel) -> list[SendWindowGate]:
    """The gate of the app's send windows, or none when no campaign has one."""
    windows = {c.name: c.send_window for c in k.app.campaigns.values()
               if c.send_window is not None}
    return [SendWindowGate(k, windows)] if windows else []


class SendWindowGate:
    """Holds a campaign's messages prepared outside its send window, in the user's zone."""

    def __init__(self, k: Kernel, windows: Mapping[str, Window]) -> None:
        self.k = k
        self._windows = dict(windows)
        self._default = default_zone(k.config.daemon.default_timezone)

    async def check(self, prepared: Sequence[_Open], now: dt.datetime) -> None:
        for p in prepared:
            window = self._windows.get(str(p.row.get("campaign")))
            if window is None or p.row["kind"] != "campaign":
                continue
            tz, fell_back = user_zone(p.user, self._default)
            if fell_back:
                count_fallback(self.k.metrics, "send_window")
            opens = window.opens(now, tz)
            if opens is not None:
                p.status, p.hold_until = "hold", opens
                p.error = (f"held for the send window {window.text} ({tz}) until "
                           f"{opens.isoformat(timespec='seconds')}Z")
