"""``rt.wait_until_local`` when its step runs: the wake time, decided once and journaled.

The flow's command carries only what it asked for (hour, minute, weekdays, an optional
zone), so its argument hash, which replay compares, never depends on the user. The step
turns it into an instant with the user's zone as the stepper loaded it (their
``timezone`` attribute, else ``[daemon] default_timezone``) and writes that instant as
the instance's ``wake_at`` and on the wait's journal row (``{"at", "zone", "fallback"}``;
the flow itself receives None). A replay walks past the row without deciding again, so a
restart, or the user moving to another zone while the instance waits, keeps the time.

``segflowd check`` reads the literal arguments of every ``rt.wait_until_local(...)`` in
the flows (:func:`local_wait_problems`) and names the file and line of a bad one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Protocol

import structlog

from ..errors import FlowError
from ..kernel import Kernel
from ..localtime import check_local_wait, count_fallback, default_zone, next_local, user_zone
from .runtime import Command

__all__ = ["local_wait_problems", "plan_local_wait"]

log = structlog.get_logger("segflowd.flows")


def plan_local_wait(k: Kernel, cmd: Command, timezone: object, now: dt.datetime
                    ) -> tuple[dt.datetime, dict[str, object]]:
    """When the instance whose user has ``timezone`` (their attribute, None without one)
    wakes for ``cmd``, in naive UTC, and what its journal row records of the decision."""
    a = cmd.args
    try:
        at, days, explicit = check_local_wait(a.get("hour"), a.get("minute"),
                                              a.get("weekdays"), a.get("timezone"))
    except ValueError as exc:  # a journal written by other code: the flow checks these
        raise FlowError(f"wait_until_local(): {exc}") from None
    fell_back = False
    tz: dt.tzinfo
    if explicit is not None:
        tz = explicit
    else:
        tz, fell_back = user_zone({"timezone": timezone},
                                  default_zone(k.config.daemon.default_timezone))
        if fell_back:
            count_fallback(k.metrics, "wait_until_local")
            log.info("flow.timezone_fallback", timezone=str(timezone)[:64], zone=str(tz))
    wake = next_local(now, tz, at, days)
    return wake, {"at": wake.isoformat(), "zone": str(tz), "fallback": fell_back}


class ScannedCall(Protocol):
    """What :func:`local_wait_problems` reads of a scanned call
    (:class:`segflowd.cli.flowscan.FlowCall`)."""

    @property
    def command(self) -> str: ...
    @property
    def where(self) -> str: ...
    @property
    def keywords(self) -> Mapping[str, object]: ...


def local_wait_problems(calls: Iterable[ScannedCall]) -> list[str]:
    """A problem per ``rt.wait_until_local`` call whose literal keyword arguments are
    wrong (an hour out of range, a weekday spec or zone name that means nothing). A
    computed argument is scanned as None and is not judged here."""
    out: list[str] = []
    defaults = {"hour": 0, "minute": 0, "weekdays": None, "timezone": None}
    for call in calls:
        if call.command != "wait_until_local":
            continue
        given = {k: call.keywords.get(k) for k in defaults}
        args = {k: defaults[k] if v is None else v for k, v in given.items()}
        try:
            check_local_wait(args["hour"], args["minute"], args["weekdays"], args["timezone"])
        except ValueError as exc:
            out.append(f"{call.where}: rt.wait_until_local(): {exc}")
    return out
