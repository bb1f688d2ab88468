"""``rt.webhook`` as a wait: the step queues the call, and its final outcome wakes the flow.

A webhook step commits, in one transaction, its journal row (result pending), the instance
``waiting`` with ``wait_event`` set to :func:`marker` (the call's dedupe key behind
``webhook:``; no ``wake_at``, so no timer and no ``instance.wake`` can move it on) and the
call's ``messages`` row (``channel="webhook"``). The outcall worker
(:mod:`segflowd.delivery.outcallservice`) settles that row and, in the same transaction,
calls :func:`record_outcome`: the outcome goes on the step's journal row — where a replay
reads it, so the call is never made again — and the instance's ``wake_at`` becomes now,
which the flow service's timer path fires like any wait. A crash between the two cannot
happen (one transaction); a crash after it leaves a due ``wake_at`` the loader finds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..app import CampaignDef
from ..delivery.outbox import Queued
from ..schema import flow_instances, flow_journal
from .journal import JournalRow
from .runtime import Command

__all__ = ["PREFIX", "StepRun", "event_wait", "is_webhook_wait", "marker", "record_outcome",
           "unfinished", "webhook_calls"]

PREFIX = "webhook:"  # wait_event of an instance waiting for its webhook's outcome


def marker(instance: int, seq: int) -> str:
    """The ``wait_event`` of instance ``instance`` waiting on its step ``seq``'s call."""
    return f"{PREFIX}flow:{instance}:{seq}"


def is_webhook_wait(wait_event: object) -> bool:
    return isinstance(wait_event, str) and wait_event.startswith(PREFIX)


class _Waiting(Protocol):
    """An instance row, as far as :func:`unfinished` reads it."""

    @property
    def wait_event(self) -> object: ...


def event_wait(wait_event: object, event_name: str | None) -> bool:
    """Whether an instance waiting on ``wait_event`` waits for events named
    ``event_name``: never a webhook's wait, whatever an event is called (any string is a
    valid event name, so one named like a marker must not end the wait)."""
    return wait_event == event_name and not is_webhook_wait(wait_event)


def unfinished(inst: _Waiting, journal: Sequence[JournalRow]) -> bool:
    """Whether ``inst`` waits on a webhook whose outcome is not journaled yet."""
    return is_webhook_wait(inst.wait_event) and not (journal and journal[-1].result)


class StepRun(Protocol):
    """What :func:`webhook_calls` reads of a stepper's run."""

    iid: int
    seq: int
    user_id: str
    end: str | None
    cmd: Command | None
    campaign: CampaignDef
    variant: str | None  # the instance's latest rt.split() result


def webhook_calls(runs: Iterable[StepRun]) -> list[Queued]:
    """The outbox rows of the runs whose step is a webhook (not ending this round).

    ``data`` is the request as the flow wrote it: secret headers from config are added at
    call time and never stored.
    """
    return [Queued(kind="campaign", template="webhook", user_id=r.user_id,
                   dedupe_key=f"flow:{r.iid}:{r.seq}", data={"url": r.cmd.name, **r.cmd.args},
                   campaign=r.campaign.name, instance_id=r.iid, channel="webhook",
                   variant=r.variant)
            for r in runs if not r.end and r.cmd is not None and r.cmd.kind == "webhook"]


async def record_outcome(conn: AsyncConnection, *, instance: int | None, dedupe_key: str,
                         outcome: Mapping[str, object], now: dt.datetime) -> bool:
    """Journal a call's final ``outcome`` (``{"value": response}`` or ``{"error": text}``)
    on its step and make the instance due now, in the caller's transaction. False when no
    instance waits on it any more (terminated, exited, forgotten): nothing is written."""
    if instance is None or not dedupe_key.startswith("flow:"):
        return False
    try:
        seq = int(dedupe_key.rsplit(":", 1)[1])
    except ValueError:
        return False
    fi = flow_instances.c
    res = await conn.execute(sa.update(flow_instances).where(
        fi.id == instance, fi.status == "waiting", fi.live == 1,
        fi.wait_event == marker(instance, seq)).values(wake_at=now, updated_at=now))
    if res.rowcount != 1:
        return False
    await conn.execute(sa.update(flow_journal).where(
        flow_journal.c.instance_id == instance, flow_journal.c.seq == seq,
        flow_journal.c.kind == "webhook").values(result=dict(outcome)))
    return True
