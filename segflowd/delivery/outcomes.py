"""Outcomes: what became of each message of a batch, recorded, published and counted.

A send result (or the status decided while preparing) becomes the row's new status in one
transaction: ``sent``; ``unknown`` when the provider may have sent it (never retried by
itself); ``queued`` again after a :func:`backoff` delay for a transient error below
``[email] max_attempts``; ``failed`` otherwise, suppressing the address where the provider
says so (a bounce); or the ``failed`` / ``suppressed`` decided without sending. A claimed
message never handed over (its mark ``sending`` failed: status ``unsent``) is ``queued``
again after the first retry's delay, its attempt given back (``message.held``, not
counted). Each outcome is then published as ``message.<status>`` (``message.retrying``
for a retry), logged and counted; the counts make the :class:`DeliveryStatistics`.
A final outcome (``sent``, ``unknown``, ``failed``, ``suppressed``) records the address
the message went (or would have gone) to in ``to_address``; one queued again resolves it
afresh at its next attempt. A user forgotten while their message was ``sending`` keeps
it forgotten: the outcome writes neither the address nor the error text (which may quote
the address) onto a row whose user was cleared meanwhile.
Nothing here grows with the number of messages sent (:class:`SendRate`).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import random
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import StoreUnavailable
from ..kernel import Kernel
from ..providers import OutgoingMessage, SendResult
from ..schema import messages, suppressions
from .prepare import Prepared, bare_address

__all__ = ["DeliveryStatistics", "Outcomes", "ProviderCounters", "ProviderStatistics",
           "SendRate", "backoff"]

log = structlog.get_logger("segflowd.delivery")

Event = tuple[str, dict[str, object]]  # a bus event: kind, data
RATE_WINDOW = 60  # seconds of sends behind sent_per_second
ERROR_MAX = 4000  # characters of an error kept in last_error
PROVIDER_ID_MAX = 255  # characters: messages.provider_message_id's length
REASON_MAX = 32  # characters: suppressions.reason's length
# A provider's error that begins "<plugin> <code>[ <enhanced code>]" ("smtp 550 5.1.1 at
# RCPT TO: ...", "postmark 406: ..."): the codes go into the suppression's reason.
_BOUNCE_CODE = re.compile(r"[A-Za-z][\w.-]* (\d{3})(?: ([245]\.\d{1,3}\.\d{1,3}))?(?=[\s:]|$)")
STOPPED_WHILE_SENDING = ("delivery stopped while the provider had the message: it may or "
                         "may not have been delivered (not re-sent)")


RECORDS_ADDRESS = ("sent", "unknown", "failed", "suppressed")  # final outcomes
ADDRESS_MAX = 320  # characters: messages.to_address's length
HELD = ("claimed", "sending")  # a worker's rows: not handed over yet, or handed over


def _ours(row: Mapping[str, Any]) -> tuple[sa.ColumnElement[bool], ...]:
    """Where a claimed row is still under the claim that gave it to this batch: a record
    retried after a lost COMMIT reply must never touch a later claim of the row."""
    ours = [messages.c.status.in_(HELD)]
    if row.get("claim") is not None:
        ours.append(messages.c.claim == row["claim"])
    return tuple(ours)


def _unless_forgotten(p: Prepared, given: Mapping[str, object]) -> dict[str, object]:
    """``given`` values for ``p``'s row, with the address and error kept as the row has
    them (cleared) if its user was forgotten since the claim: forget clears them on a
    ``sending`` row too."""
    values = dict(given)
    if p.row["user_id"] is None:  # an address of its own, never cleared by a forget
        return values
    forgotten = messages.c.user_id.is_(None)
    for column in ("to_address", "last_error"):
        if column in values:
            values[column] = sa.case((forgotten, messages.c[column]), else_=values[column])
    return values


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before retry number ``attempt`` (1-based): capped doubling, half jittered."""
    delay = min(cap, base * (2.0 ** max(0, attempt - 1)))
    return delay / 2 + rng.random() * delay / 2


@dataclasses.dataclass(frozen=True)
class ProviderStatistics:
    name: str
    plugin: str
    sent: int
    failed: int
    transient_errors: int
    batches: int
    in_flight: int
    rate: float
    concurrency: int
    outage_since: dt.datetime | None = None  # the provider is down since (None: it is up)
    outage_error: str = ""  # what it answered


@dataclasses.dataclass(frozen=True)
class DeliveryStatistics:
    """Outbox depth per status (as of the last poll), throughput and failures."""

    outbox: Mapping[str, int]
    sent: int
    failed: int
    suppressed: int
    retried: int
    unknown: int
    sent_per_second: float
    providers: tuple[ProviderStatistics, ...]


@dataclasses.dataclass
class ProviderCounters:
    """Running counts for the provider's :class:`ProviderStatistics`."""

    sent: int = 0
    failed: int = 0
    transient: int = 0
    batches: int = 0
    in_flight: int = 0


class Outcomes:
    """Records a batch's outcomes for the delivery service and keeps its counts."""

    def __init__(self, k: Kernel, *, provider_name: str, rng: random.Random,
                 shared: Outcomes | None = None, max_attempts: int | None = None,
                 channel: str = "email") -> None:
        """``shared``: another provider's :class:`Outcomes` whose outbox totals, depth and
        send rate these count into (one delivery service, several providers).
        ``max_attempts``: sends before a transient error fails a message (default
        ``[email] max_attempts``)."""
        self.k = k
        self.provider_name = provider_name
        self.max_attempts = max_attempts or k.config.email.max_attempts
        self.channel = channel  # the messages.channel its lane sends
        self.rng = rng
        self.counters = ProviderCounters()
        self.totals: dict[str, int]
        self.depth: dict[str, int]
        self.rate: SendRate
        if shared is not None:
            self.totals, self.depth, self.rate = shared.totals, shared.depth, shared.rate
            return
        self.totals = {"sent": 0, "failed": 0, "suppressed": 0, "retried": 0, "unknown": 0}
        self.depth = {}
        self.rate = SendRate()
        m = k.metrics
        m.describe("segflow_messages_total", "counter", "messages by outcome")
        m.describe("segflow_outbox_messages", "gauge", "outbox rows by status")
        m.collect(lambda: [("segflow_outbox_messages", {"status": s}, float(n))
                           for s, n in self.depth.items()])

    async def record(self, prepared: Sequence[Prepared],
                     results: Mapping[int, SendResult]) -> None:
        """Store, publish and count each outcome; ``results`` is keyed by ``id(prepared)``.

        One transaction for the batch. Should the store refuse it for a reason other than
        being unreachable (a value it will not take), each message is recorded on its own,
        and one the store still refuses gets its status alone: no row stays ``sending``
        because of one bad value. :class:`StoreUnavailable` is raised for the caller to
        retry; a row already recorded is never recorded (or counted) twice.
        """
        now = self.k.clock.now()
        decided = [(p, self._decide(p, results.get(id(p)), now)) for p in prepared]
        events: list[Event] = []
        try:
            async with self.k.store.begin() as conn:
                for p, d in decided:
                    events += await self._write(conn, p, d, now)
        except StoreUnavailable:
            raise
        except Exception as exc:
            log.error("delivery.record_batch_refused", messages=len(prepared),
                      error=_describe(exc))
            events = []
            for p, d in decided:
                events += await self._write_alone(p, d, now)
        self._publish(events)

    def _decide(self, p: Prepared, res: SendResult | None, now: dt.datetime) -> _Decision:
        ecfg = self.k.config.email
        row = p.row
        base: dict[str, object] = {"message": row["id"], "user_id": row["user_id"],
                                   "template": row["template"],
                                   "channel": row.get("channel", "email")}
        values: dict[str, object] = {"updated_at": now}
        suppress: str | None = None
        if isinstance(p.message, OutgoingMessage):
            values["message_id"] = p.message.message_id
        if res is None and p.status == "retry":
            res = SendResult(ok=False, error=p.error, transient=True)
        if res is None and p.status == "hold" and p.hold_until is not None:
            # Not to be sent yet (SMS quiet hours): queued for then, no attempt spent.
            status, error = "held", p.error
            values.update(attempts=messages.c.attempts - 1, next_attempt_at=p.hold_until)
        elif res is None and p.status == "unsent":
            # Claimed, but never handed to the provider (its mark failed): queued again
            # with its attempt given back, after the first retry's delay.
            status, error = "held", p.error
            delay = backoff(1, ecfg.retry_base, ecfg.retry_max, self.rng)
            values.update(attempts=messages.c.attempts - 1,
                          next_attempt_at=now + _seconds(delay))
        elif res is None:
            status, error = p.status or "failed", p.error
        elif res.ok:
            status, error = "sent", None
            values.update(sent_at=now, provider_message_id=self._provider_id(p, res))
        elif res.maybe_sent:
            status, error = "unknown", _text(res.error) or "the provider may have sent it"
        elif res.outage:
            # The provider is down or refuses the account, not this message: queued again
            # with its attempt given back; the lane's circuit decides when to try again.
            status, error = "held", _text(res.error)
            values.update(attempts=messages.c.attempts - 1, next_attempt_at=now)
        elif res.transient and row["attempts"] < self.max_attempts:
            status, error = "queued", _text(res.error)
            delay = backoff(row["attempts"], ecfg.retry_base, ecfg.retry_max, self.rng)
            values["next_attempt_at"] = now + _seconds(delay)
            base["retry_in_s"] = round(delay, 3)
        else:
            status, error = "failed", _text(res.error)
            if res.suppress and p.message is not None:
                suppress = bare_address(p.message.to)
        values.update(status="queued" if status == "held" else status,
                      last_error=_clip(error))
        if status in RECORDS_ADDRESS and p.address:
            values["to_address"] = p.address[:ADDRESS_MAX]
        kind = "retrying" if status == "queued" else status
        event = (f"message.{kind}", {**base, "error": error} if error else base)
        return _Decision(values, event, suppress)

    def _provider_id(self, p: Prepared, res: SendResult) -> str | None:
        pid = res.provider_message_id
        if pid is None:
            return None
        pid = str(pid)
        if len(pid) > PROVIDER_ID_MAX:  # kept as far as it fits: the column's limit
            log.warning("message.provider_id_clipped", message=p.row["id"], provider_id=pid)
            pid = pid[:PROVIDER_ID_MAX]
        return pid

    async def _write(self, conn: AsyncConnection, p: Prepared, d: _Decision,
                     now: dt.datetime) -> list[Event]:
        """The row's update (and suppression); its events when the row was still ours."""
        events: list[Event] = []
        if d.suppress is not None:
            detail = str(d.values["last_error"] or "")
            reason = _bounce_reason(detail)
            await conn.execute(self.k.store.insert_ignore(suppressions).values(
                address=d.suppress, reason=reason, source=self.provider_name,
                detail=detail[:1000], created_at=now))
            events.append(("address.suppressed", {"address": d.suppress, "reason": reason,
                                                  "source": self.provider_name}))
        done = await conn.execute(sa.update(messages).where(
            messages.c.id == p.row["id"], *_ours(p.row)).values(**_unless_forgotten(p, d.values)))
        return [*events, d.event] if done.rowcount else []

    async def _write_alone(self, p: Prepared, d: _Decision, now: dt.datetime) -> list[Event]:
        """``p``'s outcome in a transaction of its own; if the store refuses it, its status
        alone (the outcome itself is known), with why the rest is missing."""
        try:
            async with self.k.store.begin() as conn:
                return await self._write(conn, p, d, now)
        except StoreUnavailable:
            raise
        except Exception as exc:
            refused = _describe(exc)
        status = d.values["status"]
        error = d.values["last_error"]
        note = f"the store refused this outcome's details: {refused}"
        bare = {k: v for k, v in d.values.items()
                if k in ("status", "updated_at", "sent_at", "next_attempt_at", "attempts")}
        bare["last_error"] = _clip(f"{error}; {note}" if error else f"{status}; {note}")
        try:
            async with self.k.store.begin() as conn:
                done = await conn.execute(sa.update(messages).where(
                    messages.c.id == p.row["id"], *_ours(p.row)).values(
                    **_unless_forgotten(p, bare)))
        except StoreUnavailable:
            raise
        except Exception as exc:  # left `sending`: the next start makes it `unknown`
            log.error("delivery.record_failed", message=p.row["id"], status=status,
                      error=_describe(exc))
            return []
        log.error("delivery.record_refused", message=p.row["id"], status=status,
                  error=refused)
        return [d.event] if done.rowcount else []

    async def mark_sending(self, ids: Sequence[int], claim: str) -> set[int]:
        """Mark these rows of ``claim`` ``sending`` (committed before their send call);
        return the ids marked: a row no longer claimed by it is not to be sent."""
        m = messages.c
        async with self.k.store.begin() as conn:
            done = await conn.execute(sa.update(messages).where(
                m.id.in_(ids), m.status == "claimed", m.claim == claim).values(
                status="sending", updated_at=self.k.clock.now()))
            if done.rowcount == len(ids):
                return set(ids)
            return {int(i) for (i,) in await conn.execute(sa.select(m.id).where(
                m.id.in_(ids), m.status == "sending", m.claim == claim))}

    async def release(self, rows: Sequence[Mapping[str, Any]], handed: Collection[int]) -> None:
        """Resolve a batch whose worker was cancelled (a drain cut short) before it recorded
        anything: rows ``handed`` to the provider become ``unknown``, the rest (nothing of
        them went out) are ``queued`` again, their attempt not counted. A row no longer its
        own (recorded, or settled by a restart's recovery) is neither changed nor counted."""
        now = self.k.clock.now()
        ids = [int(r["id"]) for r in rows]
        gone = [i for i in ids if i in handed]
        back = [i for i in ids if i not in handed]
        ours = _ours(rows[0]) if rows else ()
        mine: set[int] = set()  # handed rows still ours (not settled by anyone else)
        async with self.k.store.begin() as conn:
            if back:
                await conn.execute(sa.update(messages).where(
                    messages.c.id.in_(back), *ours).values(
                    status="queued", attempts=messages.c.attempts - 1, updated_at=now))
            if gone:
                mine = {int(i) for (i,) in await conn.execute(sa.select(messages.c.id).where(
                    messages.c.id.in_(gone), *ours).with_for_update())}
            if mine:
                await conn.execute(sa.update(messages).where(
                    messages.c.id.in_(sorted(mine)), *ours).values(
                    status="unknown", updated_at=now, last_error=STOPPED_WHILE_SENDING))
        self._publish([("message.unknown", {"message": r["id"], "user_id": r["user_id"],
                                            "template": r["template"],
                                            "error": STOPPED_WHILE_SENDING})
                       for r in rows if int(r["id"]) in mine])

    def _publish(self, events: Sequence[Event]) -> None:
        for kind, data in events:
            self.count(kind, data)
            self.k.bus.publish(kind, **data)

    def count(self, kind: str, data: Mapping[str, object]) -> None:
        if not kind.startswith("message.") or kind == "message.held":
            return  # a held message is the provider's outage, logged once by its lane
        status = kind.removeprefix("message.")
        self.k.metrics.inc("segflow_messages_total", status=status)
        self.k.metrics.inc("segflow_channel_messages_total", channel=self.channel, status=status)
        key = {"retrying": "retried"}.get(status, status)
        if key in self.totals:
            self.totals[key] += 1
        c = self.counters
        if status == "sent":
            c.sent += 1
            self.rate.add(self.k.clock.monotonic())
            log.info("message.sent", **data)
        elif status == "failed":
            c.failed += 1
            log.warning("message.failed", **data)
        elif status == "retrying":
            c.transient += 1
            log.info("message.retrying", **data)
        elif status == "unknown":
            log.warning("message.unknown", **data)
        else:
            log.info(f"message.{status}", **data)

    # -- statistics ------------------------------------------------------------------

    async def refresh_depth(self) -> None:
        async with self.k.store.connect() as conn:
            rows = (await conn.execute(sa.select(messages.c.status, sa.func.count())
                                       .group_by(messages.c.status))).all()
        self.depth.clear()  # in place: other providers' Outcomes share it
        self.depth.update((str(s), int(n)) for s, n in rows)

    def statistics(self, providers: Sequence[ProviderStatistics]) -> DeliveryStatistics:
        return DeliveryStatistics(
            outbox=dict(self.depth), sent=self.totals["sent"], failed=self.totals["failed"],
            suppressed=self.totals["suppressed"], retried=self.totals["retried"],
            unknown=self.totals["unknown"],
            sent_per_second=self.rate.per_second(self.k.clock.monotonic()),
            providers=tuple(providers),
        )

    def provider_statistics(self, *, plugin: str, rate: float, concurrency: int,
                            outage_since: dt.datetime | None = None, outage_error: str = ""
                            ) -> ProviderStatistics:
        c = self.counters
        return ProviderStatistics(
            name=self.provider_name, plugin=plugin, sent=c.sent, failed=c.failed,
            transient_errors=c.transient, batches=c.batches, in_flight=c.in_flight,
            rate=rate, concurrency=concurrency, outage_since=outage_since,
            outage_error=outage_error)


class SendRate:
    """Sends per whole second over the last :data:`RATE_WINDOW` seconds.

    Bounded however many messages go out and whether or not anybody reads it: at most
    ``RATE_WINDOW + 1`` counters, the oldest dropped as new seconds begin.
    """

    def __init__(self) -> None:
        self._seconds: collections.deque[list[int]] = collections.deque(maxlen=RATE_WINDOW + 1)

    def add(self, now: float, n: int = 1) -> None:
        second = int(now)
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += n
        else:
            self._seconds.append([second, n])
        self._prune(now)

    def per_second(self, now: float) -> float:
        self._prune(now)
        if not self._seconds:
            return 0.0
        window = max(1.0, now - self._seconds[0][0])
        return sum(n for _, n in self._seconds) / window

    def _prune(self, now: float) -> None:
        while self._seconds and self._seconds[0][0] < now - RATE_WINDOW:
            self._seconds.popleft()


@dataclasses.dataclass(frozen=True)
class _Decision:
    """A message's outcome before it is written: the row's new values, its event and the
    address to suppress (a bounce)."""

    values: dict[str, object]
    event: Event
    suppress: str | None


def _bounce_reason(error: str) -> str:
    """The suppression reason for a bounce the provider reported with ``error``:
    ``bounce:<code>[ <enhanced code>]`` when the error begins with its codes
    (``bounce:550 5.1.1``), else ``bounce``."""
    m = _BOUNCE_CODE.match(error)
    if m is None:
        return "bounce"
    return f"bounce:{' '.join(g for g in m.groups() if g)}"[:REASON_MAX]


def _seconds(s: float) -> dt.timedelta:
    return dt.timedelta(seconds=s)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _clip(error: str | None) -> str | None:
    """An error short enough for any store's ``last_error`` (MariaDB's TEXT is 64 KB)."""
    if error is None or len(error) <= ERROR_MAX:
        return error
    return error[:ERROR_MAX - 1] + "…"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:ERROR_MAX]
