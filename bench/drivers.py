"""aiomysql vs asyncmy under the store: bulk insert of events and point reads, same run.

    .venv/bin/python bench/drivers.py            # full: 100k events, 10k point reads
    .venv/bin/python bench/drivers.py --quick    # 10k events, 1k point reads

Each driver gets a fresh MariaDB database migrated by segflowd's own Store, so the
statements are exactly the daemon's (SQLAlchemy Core over ``schema.events``). Figures,
one JSON line each:

* ``bulk_insert_rows_per_s``: ``INSERT`` of N events in batches of 1000 rows (executemany),
  one transaction per batch.
* ``point_reads_per_s``: M ``SELECT ... WHERE id = :id`` one after another on one
  connection (latency-bound: what one flow step's read costs).

asyncmy's figure is reported with aiomysql's as its baseline (``ratio`` > 1: asyncmy is
faster); aiomysql is the configured default (``mysql+aiomysql://``) and
``mysql+asyncmy://`` is accepted too. Needs MariaDB at $SEGFLOW_TEST_MARIADB
(default mysql+aiomysql://root@127.0.0.1:3306).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import time
import uuid

import sqlalchemy as sa

from segflowd import schema
from segflowd.logs import configure_logging
from segflowd.store import Store

MARIADB = os.environ.get("SEGFLOW_TEST_MARIADB", "mysql+aiomysql://root@127.0.0.1:3306")
BATCH = 1000  # rows per INSERT executemany
DRIVERS = ("aiomysql", "asyncmy")
NOW = dt.datetime(2026, 1, 1)


def emit(figure: str, value: float, unit: str, baseline: float | None,
         target: str | None = None) -> None:
    ratio = round(value / baseline, 3) if baseline else None
    print(json.dumps({"bench": "drivers", "figure": figure, "value": round(value, 1),
                      "unit": unit, "baseline": None if baseline is None else round(baseline, 1),
                      "ratio": ratio, "target": target}), flush=True)


def admin() -> sa.engine.Engine:
    url = sa.engine.make_url(MARIADB).set(drivername="mysql+pymysql", database=None)
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


async def run_driver(driver: str, events: int, reads: int) -> tuple[float, float]:
    name = f"segflow_bench_{uuid.uuid4().hex[:10]}"
    eng = admin()
    with eng.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    url = sa.engine.make_url(MARIADB).set(drivername=f"mysql+{driver}", database=name)
    store = Store.open(url.render_as_string(hide_password=False))
    try:
        await store.migrate()
        rows = [{"user_id": f"u{i % 5000}", "name": "purchase",
                 "attributes": {"amount": i % 97, "sku": f"sku-{i % 31}"},
                 "created_at": NOW, "received_at": NOW} for i in range(events)]
        t0 = time.perf_counter()
        for start in range(0, events, BATCH):
            async with store.begin() as conn:
                await conn.execute(sa.insert(schema.events), rows[start:start + BATCH])
        insert_rate = events / (time.perf_counter() - t0)

        async with store.connect() as conn:
            lo, hi = (await conn.execute(sa.select(sa.func.min(schema.events.c.id),
                                                   sa.func.max(schema.events.c.id)))).one()
        rng = random.Random(7)
        ids = [rng.randint(lo, hi) for _ in range(reads)]
        query = sa.select(schema.events.c.name, schema.events.c.attributes).where(
            schema.events.c.id == sa.bindparam("id"))
        t0 = time.perf_counter()
        async with store.connect() as conn:
            for i in ids:
                (await conn.execute(query, {"id": i})).one()
        read_rate = reads / (time.perf_counter() - t0)
        return insert_rate, read_rate
    finally:
        await store.close()
        with eng.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        eng.dispose()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10k events, 1k reads")
    args = p.parse_args()
    configure_logging("console", "warning")  # stdout carries only the JSON figures
    events, reads = (10_000, 1_000) if args.quick else (100_000, 10_000)
    results = {d: await run_driver(d, events, reads) for d in DRIVERS}
    base_insert, base_read = results["aiomysql"]
    for driver in DRIVERS:
        insert, read = results[driver]
        baseline = None if driver == "aiomysql" else (base_insert, base_read)
        emit(f"{driver}_bulk_insert_rows_per_s_{events}", insert, "rows/s",
             baseline[0] if baseline else None, ">= 20000 rows/s")
        emit(f"{driver}_point_reads_per_s_{reads}", read, "reads/s",
             baseline[1] if baseline else None, ">= 2000 reads/s")


if __name__ == "__main__":
    asyncio.run(main())
