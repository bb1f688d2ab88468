"""Gates: rules that may hold or drop a prepared message before it is rendered and sent.

A gate sees each claimed message whose fate is still open (``Prepared.status`` None),
with its row and its user read, and may decide it instead of the provider:

* ``p.status = "hold"`` with ``p.hold_until`` (naive UTC): queued again for then, its
  attempt given back (a send window not yet open, a frequency cap reached);
* ``p.status = "failed"`` / ``"suppressed"`` with ``p.error``: recorded so, never sent
  (a cap whose action is to drop).

Gates run in the order :func:`build_gates` lists them, for email and SMS alike
(:class:`~segflowd.delivery.prepare.BatchPreparer`,
:class:`~segflowd.delivery.sms.SmsPreparer`), after the address, suppression and
subscription checks and before rendering, so a held message costs no render.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..kernel import Kernel
from .capgate import cap_gates
from .sendwindow import window_gates

__all__ = ["Gate", "Open", "apply_gates", "build_gates"]


class Open(Protocol):
    """A prepared message as a gate sees it (:class:`~segflowd.delivery.prepare.Prepared`)."""

    row: Mapping[str, Any]  # the messages row: kind, channel, campaign, user_id, ...
    user: dict[str, Any]  # the user's attributes, id and email
    status: str | None
    error: str | None
    hold_until: dt.datetime | None


class Gate(Protocol):
    async def check(self, prepared: Sequence[Open], now: dt.datetime) -> None:
        """Decide what must not go out now among ``prepared`` (all still open)."""
        ...


def build_gates(k: Kernel) -> list[Gate]:
    """The gates of ``k``'s app and config, in the order they apply."""
    # caps last: a message another gate holds is not counted
    return [*window_gates(k), *cap_gates(k)]


async def apply_gates(gates: Sequence[Gate], prepared: Sequence[Open],
                      now: dt.datetime) -> None:
    for gate in gates:
        open_ = [p for p in prepared if p.status is None]
        if not open_:
            return
        await gate.check(open_, now)
