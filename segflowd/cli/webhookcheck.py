"""``segflowd check`` on ``rt.webhook`` calls: a literal URL ``[webhooks] allow`` refuses.

Only what the flow's code spells out is judged, and without DNS (the literal rules of
:func:`segflowd.delivery.outcalls.literal_refusal`); a computed URL is judged at send time.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..config import Config
from ..delivery.outcalls import literal_refusal
from .flowscan import FlowCall

__all__ = ["webhook_problems"]


def webhook_problems(config: Config, calls: Iterable[FlowCall]) -> list[str]:
    """One problem per ``rt.webhook("literal URL")`` that would be refused, with file:line."""
    out: list[str] = []
    for call in calls:
        if call.command != "webhook":
            continue
        url = call.name if call.name is not None else call.keywords.get("url")
        if not isinstance(url, str):
            continue  # computed: judged when it is called
        why = literal_refusal(url, config.webhooks)
        if why is not None:
            out.append(f"{call.where}: campaign {call.campaign!r}: rt.webhook refused: {why}")
    return out
