"""The frequency-cap gate: no user gets more marketing on a channel than its caps allow.

``[email] max_marketing`` and ``[sms] max_marketing`` (:mod:`segflowd.caps`) count a
user's campaign and broadcast messages (:data:`~segflowd.providers.MARKETING_KINDS`) on
that channel in rolling windows; transactional and test messages are never counted nor
held. What counts is what went out or may have: rows ``sent`` (at ``sent_at``),
``sending`` (handed over now) and ``unknown`` (a crash mid-send: it may have gone out),
the last two at ``updated_at``; plus the messages of the same batch this gate let through
before, in batch order, so a batch with five mails for one user sends three under "3/day".

A message over a cap is, per ``cap_action``:

* ``defer`` (the default): held (status ``queued`` again, its attempt given back, its
  ``last_error`` saying which cap and until when) until the next allowed time, when the
  oldest counted message of the full window leaves it; over several caps, the latest of
  their times;
* ``drop``: recorded ``suppressed`` with ``last_error`` "frequency cap: 3/day reached",
  never sent.

Races: two delivery workers (or two daemons on one store) preparing batches at once do
not see each other's messages until those are marked ``sending``, just before their send
call. Each may let through what the user's remaining allowance permits, so a window can
exceed its cap by at most what the other concurrent workers let through: with one message
per user per batch (the usual case), by at most the number of workers minus one.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import sqlalchemy as sa

from ..caps import Cap, parse_caps
from ..kernel import Kernel
from ..providers import MARKETING_KINDS
from ..schema import messages

__all__ = ["CapGate", "cap_gates"]

COUNTED = ("sent", "sending", "unknown")  # statuses of messages that went out, or may have
_SINCE_SENDING = ("sending", "unknown")  # ... of which these have no sent_at


class _Open(Protocol):
    """What this gate reads and sets of a prepared message (:class:`~.gates.Open`;
    not imported from there: :mod:`.gates` builds this gate)."""

    row: Mapping[str, Any]  # the messages row: kind, channel, user_id
    status: str | None
    error: str | None
    hold_until: dt.datetime | None


class _Rule:
    def __init__(self, caps: tuple[Cap, ...], action: str) -> None:
        self.caps = caps
        self.action = action
        self.longest = max(c.window for c in caps)


def cap_gates(k: Kernel) -> list[CapGate]:
    """The gate of ``k``'s configured caps, or none when no channel has any."""
    rules: dict[str, _Rule] = {}
    configured = {"email": (k.config.email.max_marketing, k.config.email.cap_action),
                  "sms": (k.config.sms.max_marketing, k.config.sms.cap_action)}
    for channel, (text, action) in configured.items():
        caps = parse_caps(text)
        if caps:
            rules[channel] = _Rule(caps, action)
    return [CapGate(k, rules)] if rules else []


class CapGate:
    """Holds or drops the marketing messages of a batch that would exceed a cap."""

    def __init__(self, k: Kernel, rules: dict[str, _Rule]) -> None:
        self.k = k
        self._rules = rules

    async def check(self, prepared: Sequence[_Open], now: dt.datetime) -> None:
        by_channel: dict[str, list[_Open]] = defaultdict(list)
        for p in prepared:
            channel = str(p.row.get("channel") or "email")
            if (p.row["kind"] in MARKETING_KINDS and p.row["user_id"] is not None
                    and channel in self._rules):
                by_channel[channel].append(p)
        for channel, batch in by_channel.items():
            rule = self._rules[channel]
            history = await self._history(channel, sorted({str(p.row["user_id"])
                                                           for p in batch}),
                                          now - rule.longest)
            for p in batch:
                times = history[str(p.row["user_id"])]
                self._decide(p, rule, times, now)

    def _decide(self, p: _Open, rule: _Rule, times: list[dt.datetime],
                now: dt.datetime) -> None:
        """Let ``p`` through (counting it in ``times``), or hold or drop it."""
        reached: Cap | None = None
        until = now
        for cap in rule.caps:
            inside = sorted(t for t in times if t > now - cap.window)
            if len(inside) >= cap.limit:
                # Allowed again once all but limit - 1 of them have left the window.
                free = inside[len(inside) - cap.limit] + cap.window
                if reached is None or free > until:
                    reached, until = cap, free
        if reached is None:
            times.append(now)
            return
        if rule.action == "drop":
            p.status, p.error = "suppressed", f"frequency cap: {reached.text} reached"
            return
        p.status, p.hold_until = "hold", until
        p.error = (f"frequency cap: {reached.text} reached; held until "
                   f"{until.isoformat(timespec='seconds')}Z")

    async def _history(self, channel: str, user_ids: list[str],
                       since: dt.datetime) -> dict[str, list[dt.datetime]]:
        """When each user's counted marketing on ``channel`` went out after ``since``.

        Read through ``ix_messages_user`` (its ``user_id`` prefix): a user's own rows only.
        """
        m = messages.c
        query = sa.select(m.user_id, m.status, m.sent_at, m.updated_at).where(
            m.user_id.in_(user_ids), m.channel == channel,
            m.kind.in_(sorted(MARKETING_KINDS)),
            sa.or_(sa.and_(m.status == "sent", m.sent_at > since),
                   sa.and_(m.status.in_(_SINCE_SENDING), m.updated_at > since)))
        out: dict[str, list[dt.datetime]] = defaultdict(list)
        async with self.k.store.connect() as conn:
            for r in (await conn.execute(query)).mappings():
                at = r["sent_at"] if r["status"] == "sent" else r["updated_at"]
                out[str(r["user_id"])].append(at)
        return out
