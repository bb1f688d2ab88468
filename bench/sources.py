"""Data sources benchmark: audience sync into the store and preload at send time.

    .venv/bin/python bench/sources.py                  # 100k-profile audience
    .venv/bin/python bench/sources.py --quick          # 10k profiles
    .venv/bin/python bench/sources.py --store sqlite   # or mariadb, or both (default)

A fresh PostgreSQL database (the customer's) is seeded with generate_series on
127.0.0.1:5432 and dropped afterwards; the store is a fresh SQLite file or MariaDB
database. Figures, one JSON line each, with a baseline measured in the same run:

* ``audience_sync``: profiles/s of a first sync (every profile upserted as a user and
  joined), against reading the same audience query through the same source alone.
* ``audience_resync``: profiles/s of a second sync with nothing changed, same baseline.
* ``preload``: profiles/s of the template ``profile`` context (the user's audiences from
  the store, then the preload query), against the preload query alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import sqlalchemy as sa
from _stores import KINDS, store_url  # bench/ is on sys.path when run as a script

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.sources.audiences import AudienceService
from segflowd.sources.datasources import DataSources, PreloadContext
from segflowd.sources.pools import SourceService
from segflowd.store import Store
from segflowd.testing import FakeClock

POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
PRELOAD_SAMPLE = 2_000  # profiles whose context is built in the preload figure

SCHEMA = [
    "CREATE TABLE users (id text PRIMARY KEY, email text, first_name text, "
    "plan_type text NOT NULL, metadata jsonb NOT NULL)",
    "CREATE TABLE memberships (user_id text NOT NULL, community_id integer NOT NULL)",
    "CREATE TABLE user_profiles (user_id text PRIMARY KEY, plan_name text, "
    "total_purchases integer, preferred_language text)",
    "CREATE INDEX ix_memberships_community ON memberships (community_id)",
]
SEED = [
    "INSERT INTO users SELECT 'p' || g, 'p' || g || '@example.com', 'Name ' || g, "
    "CASE WHEN g % 3 = 0 THEN 'pro' ELSE 'free' END, "
    "jsonb_build_object('preferred_language', 'en') FROM generate_series(1, :n) g",
    "INSERT INTO memberships SELECT 'p' || g, 1 FROM generate_series(1, :n) g",
    "INSERT INTO user_profiles SELECT 'p' || g, 'Plan ' || (g % 5), g % 40, 'en' "
    "FROM generate_series(1, :n) g",
]
AUDIENCE = """SELECT u.id AS profile_id, u.email, u.first_name, u.plan_type
FROM users u JOIN memberships m ON u.id = m.user_id
WHERE m.community_id = '<%= community_id %>' AND u.email IS NOT NULL"""
PRELOAD = """SELECT plan_name, total_purchases, preferred_language
FROM user_profiles WHERE user_id = '<%= profile_id %>'"""


def emit(figure: str, store: str, value: float, unit: str, baseline: float,
         **extra: object) -> None:
    print(json.dumps({"bench": "sources", "figure": figure, "store": store,
                      "value": round(value, 1), "unit": unit, "baseline": round(baseline, 1),
                      "ratio": round(value / baseline, 3) if baseline else None, **extra}),
          flush=True)


@contextmanager
def customer_database(profiles: int) -> Iterator[str]:
    """A seeded PostgreSQL database of ``profiles`` profiles in community 1; its URL."""
    name = f"segflow_bench_{uuid.uuid4().hex[:10]}"
    admin_url = sa.engine.make_url(POSTGRES).set(drivername="postgresql+psycopg2")
    admin = sa.create_engine(admin_url, poolclass=sa.pool.NullPool,
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')  # a generated name, not input
    try:
        db = sa.create_engine(admin_url.set(database=name), poolclass=sa.pool.NullPool)
        with db.begin() as conn:
            for ddl in SCHEMA:
                conn.exec_driver_sql(ddl)
            for sql in SEED:
                conn.execute(sa.text(sql), {"n": profiles})
            conn.exec_driver_sql("ANALYZE")
        db.dispose()
        yield sa.engine.make_url(POSTGRES).set(database=name).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@asynccontextmanager
async def harness(url: str, crm_url: str, folder: Path) -> AsyncIterator[
        tuple[Kernel, SourceService, DataSources, AudienceService]]:
    app = Segflow(templates="templates")
    app.data_source("community", source="crm", audience=AUDIENCE, preload=PRELOAD)
    app.audience_segment("members", data_source="community", values={"community_id": 1})
    path = folder / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                    '[providers.outbox]\nplugin = "outbox"\n'
                    f'[sources.crm]\nurl = "{crm_url}"\n')
    store = Store.open(url)
    await store.migrate()
    try:
        k = Kernel(config=load_config(path, environ={}), app=app, store=store,
                   clock=FakeClock(), bus=Bus(), metrics=Metrics())
        sources = SourceService(k)
        ds = DataSources(sources, app.data_sources, app.audiences)
        try:
            yield k, sources, ds, AudienceService(k, ds, ingest_sinks=[])
        finally:
            await sources.aclose()
    finally:
        await store.close()


async def bench_store(kind: str, crm_url: str, profiles: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, store_url(kind, Path(tmp)) as url:
        async with harness(url, crm_url, Path(tmp)) as (k, _sources, ds, audiences):
            t0 = time.perf_counter()
            n = 0
            async for batch in ds.audience("community", {"community_id": 1}):
                n += len(batch)
            read_rate = n / (time.perf_counter() - t0)

            t0 = time.perf_counter()
            first = await audiences.sync("members")
            sync_rate = first.size / (time.perf_counter() - t0)
            emit("audience_sync", kind, sync_rate, "profiles/s", read_rate,
                 profiles=first.size, joined=first.joined)

            t0 = time.perf_counter()
            again = await audiences.sync("members")
            emit("audience_resync", kind, again.size / (time.perf_counter() - t0),
                 "profiles/s", read_rate, profiles=again.size, changed=again.updated)

            ids = [f"p{i}" for i in range(1, min(profiles, PRELOAD_SAMPLE) + 1)]
            t0 = time.perf_counter()
            for pid in ids:
                await ds.preload("community", pid, {"community_id": 1})
            bare = len(ids) / (time.perf_counter() - t0)
            context = PreloadContext(ds, k.store)
            t0 = time.perf_counter()
            for pid in ids:
                got = await context.context_for(pid, {})
                assert "profile" in got, pid  # a member: the preload row is there
            emit("preload", kind, len(ids) / (time.perf_counter() - t0), "profiles/s", bare,
                 profiles=len(ids))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="10k profiles instead of 100k")
    p.add_argument("--profiles", type=int, default=None, help="audience size")
    p.add_argument("--store", choices=("sqlite", "mariadb", "both"), default="both")
    args = p.parse_args()
    profiles = args.profiles or (10_000 if args.quick else 100_000)
    kinds = KINDS if args.store == "both" else (args.store,)
    with customer_database(profiles) as crm_url:
        for kind in kinds:
            anyio.run(bench_store, kind, crm_url, profiles)


if __name__ == "__main__":
    main()
