"""Campaign report benchmark: the report over N messages against a bare count of them.

    .venv/bin/python bench/reports.py                    # 1M messages, SQLite and MariaDB
    .venv/bin/python bench/reports.py --quick            # 100k messages
    .venv/bin/python bench/reports.py --store mariadb --messages 300000

Fills a fresh store (MariaDB: generated inside the server from its sequence engine;
SQLite: a recursive CTE) with messages across 4 campaigns, 3 steps and 2 variants over
30 days, plus engagement (human and machine opens, clicks), outcome events and
conversions in proportion. Then times the report of every campaign, of one campaign and
of one campaign since a date (the best of ``--repeat`` runs each) against
``SELECT COUNT(*) FROM messages`` in the same run. ``report_first`` is the first report,
which also copies every engagement row into ``message_events`` (later ones copy only
what is new). Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import sqlalchemy as sa
from _stores import KINDS, store_url  # bench/ is on sys.path when run as a script

from segflowd.reports import report
from segflowd.store import Store

CHUNK = 100_000  # messages per generating INSERT
BASE = dt.datetime(2026, 1, 1)

# Each message's fields derive from its number n: campaign n % 4, step, variant, day.
_MESSAGES = {
    "mysql": (
        "INSERT INTO messages (user_id, kind, channel, campaign, template, status, attempts,"
        " created_at, updated_at, sent_at, step, variant) "
        "SELECT CONCAT('u', seq), 'campaign', 'email', CONCAT('c', seq % 4),"
        " CONCAT('t', (seq DIV 4) % 3 + 1),"
        " CASE WHEN seq % 20 = 0 THEN 'failed' WHEN seq % 20 = 1 THEN 'queued' ELSE 'sent' END,"
        " 1, :base + INTERVAL (seq % 30) DAY, :base + INTERVAL (seq % 30) DAY,"
        " :base + INTERVAL (seq % 30) DAY, (seq DIV 4) % 3 + 1,"
        " CASE WHEN (seq DIV 12) % 2 = 0 THEN 'control' ELSE 'b' END "
        "FROM seq_1_to_10000000 WHERE seq BETWEEN :lo AND :hi"),
    "sqlite": (
        "WITH RECURSIVE s(seq) AS (SELECT :lo UNION ALL SELECT seq + 1 FROM s WHERE seq < :hi) "
        "INSERT INTO messages (user_id, kind, channel, campaign, template, status, attempts,"
        " created_at, updated_at, sent_at, step, variant) "
        "SELECT 'u' || seq, 'campaign', 'email', 'c' || (seq % 4), 't' || ((seq / 4) % 3 + 1),"
        " CASE WHEN seq % 20 = 0 THEN 'failed' WHEN seq % 20 = 1 THEN 'queued' ELSE 'sent' END,"
        " 1, datetime(:base, '+' || (seq % 30) || ' days'),"
        " datetime(:base, '+' || (seq % 30) || ' days'),"
        " datetime(:base, '+' || (seq % 30) || ' days'), (seq / 4) % 3 + 1,"
        " CASE WHEN (seq / 12) % 2 = 0 THEN 'control' ELSE 'b' END FROM s"),
}
# In proportion to the messages: 30% opened by a person (10% by a machine too), 8%
# clicked, 90% delivered, 2% bounced, 0.1% complained, 0.5% unsubscribed, 2-4% converted.
_REST = (
    "INSERT INTO engagement (message_id, kind, created_at, hits, machine) SELECT id, 'open',"
    " created_at, 1, 0 FROM messages WHERE status = 'sent' AND id % 10 < 3",
    "INSERT INTO engagement (message_id, kind, created_at, hits, machine) SELECT id, 'open',"
    " created_at, 1, 1 FROM messages WHERE status = 'sent' AND id % 10 = 0",
    "INSERT INTO engagement (message_id, kind, url, created_at, hits, machine) SELECT id,"
    " 'click', 'https://example.org/', created_at, 1, 0 FROM messages"
    " WHERE status = 'sent' AND id % 25 < 2",
    "INSERT INTO message_events (message_id, kind, created_at) SELECT id, 'delivered',"
    " created_at FROM messages WHERE status = 'sent' AND id % 100 < 90",
    "INSERT INTO message_events (message_id, kind, created_at) SELECT id, 'bounced',"
    " created_at FROM messages WHERE status = 'sent' AND id % 100 IN (95, 96)",
    "INSERT INTO message_events (message_id, kind, created_at) SELECT id, 'complained',"
    " created_at FROM messages WHERE status = 'sent' AND id % 1000 = 999",
    "INSERT INTO message_events (message_id, kind, created_at) SELECT id, 'unsubscribed',"
    " created_at FROM messages WHERE status = 'sent' AND id % 200 = 7",
    "INSERT INTO conversions (campaign, message_id, template, variant, event_id, event_name,"
    " converted_at) SELECT campaign, id, template, variant, id, 'purchase', created_at"
    " FROM messages WHERE status = 'sent' AND (id % 50 = 3 OR (variant = 'b' AND id % 50 = 4))",
)


def emit(figure: str, store: str, value: float, unit: str, baseline: float | None = None,
         **extra: object) -> None:
    """One JSON line; ``ratio`` is value / baseline."""
    ratio = round(value / baseline, 2) if baseline else None
    print(json.dumps({"bench": "reports", "figure": figure, "store": store,
                      "value": round(value, 4), "unit": unit,
                      "baseline": None if baseline is None else round(baseline, 4),
                      "ratio": ratio, **extra}), flush=True)


async def fill(store: Store, n: int) -> None:
    sql = sa.text(_MESSAGES["sqlite" if store.dialect == "sqlite" else "mysql"])
    for lo in range(1, n + 1, CHUNK):
        async with store.begin() as conn:
            await conn.execute(sql, {"lo": lo, "hi": min(lo + CHUNK - 1, n), "base": BASE})
    for statement in _REST:
        async with store.begin() as conn:
            await conn.execute(sa.text(statement))
    if store.dialect != "sqlite":
        async with store.begin() as conn:
            for table in ("messages", "engagement", "message_events", "conversions"):
                await conn.execute(sa.text("ANALYZE TABLE " + table))  # a fixed name
    else:
        async with store.begin() as conn:
            await conn.execute(sa.text("ANALYZE"))


async def best(repeat: int, fn: Callable[[], Awaitable[object]]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return min(times)


async def bench(kind: str, n: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as folder, store_url(kind, Path(folder)) as url:
        store = Store.open(url)
        try:
            await store.migrate()
            t0 = time.perf_counter()
            await fill(store, n)
            emit("fill", kind, time.perf_counter() - t0, "s", messages=n)

            async def count() -> object:
                async with store.connect() as conn:
                    return (await conn.execute(sa.text("SELECT COUNT(*) FROM messages"))).scalar()

            baseline = await best(repeat, count)
            emit("count_messages", kind, baseline, "s", messages=n)
            t0 = time.perf_counter()
            everything = await report(store)  # copies every engagement row first
            emit("report_first", store=kind, value=time.perf_counter() - t0, unit="s",
                 baseline=baseline, messages=n)
            rows = len(everything.rows)
            queued = sum(r.counts["queued"] for r in everything.rows)
            assert queued == n, (queued, n)
            cases: tuple[tuple[str, Callable[[], Awaitable[object]]], ...] = (
                ("report_all", lambda: report(store)),
                ("report_campaign", lambda: report(store, campaign="c1")),
                ("report_campaign_since", lambda: report(
                    store, campaign="c1", since=BASE + dt.timedelta(days=23))),
            )
            for figure, fn in cases:
                emit(figure, kind, await best(repeat, fn), "s", baseline, messages=n, rows=rows)
        finally:
            await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--quick", action="store_true", help="100k messages")
    p.add_argument("--store", choices=KINDS, action="append",
                   help="sqlite or mariadb (default: both)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the best counts")
    args = p.parse_args()
    n = 100_000 if args.quick else args.messages
    if not 1 <= n <= 10_000_000:
        p.error("--messages must be between 1 and 10000000")
    for kind in args.store or KINDS:
        anyio.run(bench, kind, n, args.repeat)


if __name__ == "__main__":
    main()
