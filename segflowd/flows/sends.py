"""The messages a step queues in its own transaction: ``send_email`` and ``send_sms`` (one
row of their channel, the template checked first) and ``webhook`` (a call, see
:mod:`segflowd.flows.webhookwait`). Each row's dedupe key is the step's,
``flow:<instance>:<seq>``, so a step's message exists exactly once."""

from __future__ import annotations

from collections.abc import Iterable

from ..app import Segflow
from ..delivery.outbox import Channel, Queued
from ..errors import FlowError
from .runtime import Command
from .webhookwait import StepRun, webhook_calls

__all__ = ["QUEUEING", "SENDS", "check_send", "queued_by"]

# Commands that send a template, and the channel of the message they queue.
SENDS: dict[str, Channel] = {"send_email": "email", "send_sms": "sms"}
QUEUEING = frozenset({*SENDS, "webhook"})  # commands whose step queues a message


def check_send(app: Segflow, cmd: Command) -> None:
    """FlowError for a send of a template the app does not define: queued, it would only
    fail at delivery while the flow went on as if sent."""
    if cmd.kind not in SENDS:
        return
    email = cmd.kind == "send_email"
    known = app.templates if email else app.sms_templates
    if cmd.name not in known:
        what = "templates" if email else "SMS templates"
        raise FlowError(f"{cmd.kind}({cmd.name!r}): unknown template {cmd.name!r} "
                        f"({what}: {', '.join(sorted(known)) or 'none'})")


def queued_by(runs: Iterable[StepRun]) -> list[Queued]:
    """The outbox rows of the runs whose step sends or calls (not ending this round)."""
    runs = list(runs)
    return [Queued(kind="campaign", template=str(r.cmd.name), user_id=r.user_id,
                   dedupe_key=f"flow:{r.iid}:{r.seq}", data=dict(r.cmd.args),
                   campaign=r.campaign.name, instance_id=r.iid, channel=SENDS[r.cmd.kind],
                   step=r.seq, variant=r.variant, topic=r.campaign.topic)
            for r in runs if not r.end and r.cmd is not None and r.cmd.kind in SENDS
            ] + webhook_calls(runs)
