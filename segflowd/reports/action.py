"""The control socket's ``report`` action (and the arguments the CLI shares with it)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from ..kernel import Action, Kernel
from .query import report

__all__ = ["ACTION", "parse_since", "register"]

ACTION = "report"


def parse_since(value: object) -> dt.datetime | None:
    """``since`` as naive UTC: an ISO date (``2026-03-01``) or date-time; ValueError
    naming what is wrong otherwise."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("'since' must be an ISO date like 2026-03-01")
    text = value.strip()
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            return dt.datetime(day.year, day.month, day.day)
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"'since' is not an ISO date or date-time: {value!r}") from None
    return when if when.tzinfo is None else when.astimezone(dt.UTC).replace(tzinfo=None)


def register(k: Kernel) -> None:
    """Add the ``report`` action to the kernel's actions.

    Arguments: ``campaign`` (optional name), ``since`` (optional ISO date or date-time,
    UTC). Answer: :meth:`~segflowd.reports.query.Report.as_json`."""
    k.actions[ACTION] = _action(k)


def _action(k: Kernel) -> Action:
    async def run(args: Mapping[str, object]) -> object:
        unknown = sorted(set(args) - {"campaign", "since"})
        if unknown:
            raise ValueError(f"unknown argument {unknown[0]!r} (known: campaign, since)")
        campaign = args.get("campaign")
        if campaign is not None and (not isinstance(campaign, str) or not campaign):
            raise ValueError("'campaign' must be a campaign name")
        found = await report(k.store, campaign=campaign, since=parse_since(args.get("since")),
                             now=k.clock.now())
        return found.as_json()

    return run
