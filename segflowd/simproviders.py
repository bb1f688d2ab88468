"""The simulation's providers: every message kept in memory, every send a success.

:class:`MemoryProvider` takes the mail and :class:`MemorySmsProvider` the SMS that
delivery hands over in a :class:`~segflowd.simulation.Simulation`; what they took becomes
the :class:`SentMessage` list ``sim.sent()`` returns, email and SMS alike (``channel``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

from .providers import OutgoingMessage, OutgoingSms, SendResult

__all__ = ["MAX_BATCH", "MemoryProvider", "MemorySmsProvider", "SentMessage"]

MAX_BATCH = 1000  # messages the in-memory providers take per call


@dataclasses.dataclass(frozen=True)
class SentMessage:
    """A rendered message that delivery handed to the (in-memory) provider.

    An SMS has ``channel="sms"``, its number in ``to`` and its body in ``text`` (no
    subject, no HTML, no MIME)."""

    id: int  # the outbox row (what :meth:`Simulation.open` and ``click`` take)
    user_id: str | None
    template: str
    subject: str
    to: str
    html: str
    text: str
    at: dt.datetime  # naive UTC, the simulation's clock
    campaign: str | None
    kind: str  # campaign, transaction, broadcast, test
    mime: bytes  # the whole RFC 5322 message, as a provider would send it
    channel: str = "email"  # email | sms


class MemoryProvider:
    """A provider that keeps every message it is given (and always succeeds)."""

    def __init__(self) -> None:
        self.max_batch = MAX_BATCH
        self.messages: dict[int, OutgoingMessage] = {}

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        for msg in batch:
            self.messages[msg.id] = msg
        return [SendResult(ok=True, provider_message_id=f"sim-{m.id}") for m in batch]

    async def aclose(self) -> None:
        return None


class MemorySmsProvider:
    """The SMS provider of a simulation: keeps every SMS (and always succeeds)."""

    def __init__(self) -> None:
        self.max_batch = MAX_BATCH
        self.messages: dict[int, OutgoingSms] = {}

    async def send(self, batch: Sequence[OutgoingSms]) -> list[SendResult]:
        for msg in batch:
            self.messages[msg.id] = msg
        return [SendResult(ok=True, provider_message_id=f"sim-sms-{m.id}") for m in batch]

    async def aclose(self) -> None:
        return None

    def sent(self, mid: int, **fields: object) -> SentMessage:
        """The :class:`SentMessage` of SMS ``mid`` (the rest of its fields given)."""
        msg = self.messages[mid]
        return SentMessage(id=mid, subject="", to=msg.to, html="", text=msg.body, mime=b"",
                           channel="sms", **fields)  # type: ignore[arg-type]  # reason: the caller gives the row's fields
