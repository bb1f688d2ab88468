"""The campaign report: what each send position, template, variant and day did.

Three grouped queries, each over one covering index range, so none joins per message:
``messages`` by status (``ix_messages_report``), ``message_events`` by kind
(``ix_message_events_report``: webhook outcomes, unsubscribes, and a person's opens and
clicks, copied from ``engagement`` first by :mod:`.catchup`) and ``conversions`` (joined to
their messages; a few per cent of them). Every count is of messages, so a message opened
five times, or by a prefetcher and a person, counts once, and a machine's open not at all.

``queued`` counts every message the campaign queued (whatever became of it); ``sent``,
``failed`` and ``suppressed`` count by status; ``delivered``, ``bounced`` and
``complained`` come from provider webhooks (only Postmark and SES send them); the rates
are over ``sent``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

from ..schema import conversions, message_events, messages
from ..store import Store
from .catchup import catch_up
from .stats import VariantRow, compare_variants

__all__ = ["COUNTS", "RATES", "Report", "ReportRow", "report", "sum_rows"]

# The counts of a row, in the order tables and CSV show them.
COUNTS = ("queued", "sent", "failed", "suppressed", "delivered", "bounced", "complained",
          "opened_unique", "clicked_unique", "unsubscribed", "converted")
# The counts that also have a rate over ``sent``.
RATES = ("delivered", "bounced", "complained", "opened_unique", "clicked_unique",
         "unsubscribed", "converted")


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One (campaign, step, template, variant, day): its counts and rates over ``sent``."""

    campaign: str
    step: int | None  # the flow position that queued it (None before schema version 10)
    template: str
    variant: str | None
    day: dt.date
    counts: Mapping[str, int]
    rates: Mapping[str, float | None]

    def as_json(self) -> dict[str, object]:
        return {"campaign": self.campaign, "step": self.step, "template": self.template,
                "variant": self.variant, "day": self.day.isoformat(), **self.counts,
                **{f"{k}_rate": v for k, v in self.rates.items()}}


@dataclasses.dataclass(frozen=True)
class Report:
    campaign: str | None  # the filter, if any
    since: dt.datetime | None
    rows: tuple[ReportRow, ...]
    variants: tuple[VariantRow, ...]

    def as_json(self) -> dict[str, object]:
        return {"campaign": self.campaign,
                "since": None if self.since is None else self.since.isoformat(),
                "rows": [r.as_json() for r in self.rows],
                "variants": [dataclasses.asdict(v) for v in self.variants]}


def rates(counts: Mapping[str, int]) -> dict[str, float | None]:
    """Each of :data:`RATES` over ``counts["sent"]`` (None when nothing was sent)."""
    sent = counts.get("sent", 0)
    return {k: round(counts.get(k, 0) / sent, 6) if sent else None for k in RATES}


def sum_rows(rows: Iterable[ReportRow], key: Any) -> dict[Any, dict[str, int]]:
    """Counts summed by ``key(row)`` (the TUI's bars per step, the CLI's totals)."""
    out: dict[Any, dict[str, int]] = {}
    for r in rows:
        acc = out.setdefault(key(r), dict.fromkeys(COUNTS, 0))
        for k in COUNTS:
            acc[k] += r.counts[k]
    return out


Key = tuple[str, int | None, str, str | None, dt.date]  # campaign, step, template, variant, day


def _statements(campaign: str | None, since: dt.datetime | None
                ) -> tuple[sa.Select[Any], sa.Select[Any], sa.Select[Any]]:
    """Messages by status, outcome events by kind and conversions, each grouped by the
    report key; each reads one index range of its table (conversions: and its messages)."""
    m, ev, c = messages.c, message_events.c, conversions.c

    def where(campaign_col: Any, time_col: Any) -> list[sa.ColumnElement[bool]]:
        out: list[sa.ColumnElement[bool]] = [campaign_col.is_not(None)]
        if campaign is not None:
            out.append(campaign_col == campaign)
        if since is not None:
            out.append(time_col >= since)
        return out

    def status(name: str) -> sa.ColumnElement[Any]:
        return sa.func.sum(sa.case((m.status == name, 1), else_=0)).label(name)

    mday = sa.func.date(m.created_at).label("day")
    per_message = (
        sa.select(m.campaign, m.step, m.template, m.variant, mday,
                  sa.func.count().label("queued"), status("sent"), status("failed"),
                  status("suppressed"))
        .where(*where(m.campaign, m.created_at))
        .group_by(m.campaign, m.step, m.template, m.variant, mday))
    for dialect in ("mysql", "mariadb"):
        # With a start date MariaDB picks ix_messages_campaign (the same prefix, narrower)
        # and reads every row: 20 times slower than the covering index on 1M messages.
        per_message = per_message.with_hint(messages, "USE INDEX (ix_messages_report)",
                                            dialect_name=dialect)
    eday = sa.func.date(ev.sent_on).label("day")
    per_event = (
        sa.select(ev.campaign, ev.step, ev.template, ev.variant, eday, ev.kind,
                  sa.func.count().label("n"))
        .where(*where(ev.campaign, ev.sent_on))
        .group_by(ev.campaign, ev.step, ev.template, ev.variant, eday, ev.kind))
    cwhere = where(m.campaign, m.created_at)
    if campaign is not None:
        cwhere.append(c.campaign == campaign)  # by ix_conversions_campaign
    per_conversion = (
        sa.select(m.campaign, m.step, m.template, m.variant, mday, sa.func.count().label("n"))
        .select_from(conversions.join(messages, m.id == c.message_id))
        .where(*cwhere)
        .group_by(m.campaign, m.step, m.template, m.variant, mday))
    return per_message, per_event, per_conversion


_EVENT_COUNTS = {"delivered": "delivered", "bounced": "bounced", "complained": "complained",
                 "unsubscribed": "unsubscribed", "opened": "opened_unique",
                 "clicked": "clicked_unique"}


def _day(value: object) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value))  # SQLite's date() is text


def _sort_key(r: ReportRow) -> tuple[Any, ...]:
    return (r.campaign, r.step is None, r.step or 0, r.template, r.variant is not None,
            r.variant or "", r.day)


async def report(store: Store, *, campaign: str | None = None,
                 since: dt.datetime | dt.date | None = None,
                 now: dt.datetime | None = None) -> Report:
    """The report of every campaign's messages (or ``campaign``'s), queued at ``since``
    or later; rows by campaign, step, template, variant and day.

    First copies the opens and clicks stored since the last report
    (:func:`~segflowd.reports.catchup.catch_up`; ``now`` stamps its cursor)."""
    start = since if since is None or isinstance(since, dt.datetime) else dt.datetime(
        since.year, since.month, since.day)
    await catch_up(store, now or dt.datetime.now(dt.UTC).replace(tzinfo=None))
    per_message, per_event, per_conversion = _statements(campaign, start)
    counts: dict[Key, dict[str, int]] = {}

    def acc(r: Any) -> dict[str, int]:
        key = (str(r.campaign), r.step, str(r.template), r.variant, _day(r.day))
        return counts.setdefault(key, dict.fromkeys(COUNTS, 0))

    async with store.connect() as conn:
        for r in await conn.execute(per_message):
            row = acc(r)
            for k in ("queued", "sent", "failed", "suppressed"):
                row[k] = int(getattr(r, k) or 0)
        for r in await conn.execute(per_event):
            name = _EVENT_COUNTS.get(str(r.kind))
            if name is not None:
                acc(r)[name] += int(r.n)
        for r in await conn.execute(per_conversion):
            acc(r)["converted"] += int(r.n)
    rows = sorted((ReportRow(campaign=k[0], step=k[1], template=k[2], variant=k[3], day=k[4],
                             counts=v, rates=rates(v)) for k, v in counts.items()),
                  key=_sort_key)
    by_variant = sum_rows(rows, lambda r: (r.campaign, r.variant))
    variants = compare_variants((c, v, t["queued"], t["sent"], t["converted"])
                                for (c, v), t in by_variant.items())
    return Report(campaign=campaign, since=start, rows=tuple(rows), variants=tuple(variants))
