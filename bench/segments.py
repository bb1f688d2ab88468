"""Segment engine benchmark on MariaDB: incremental throughput, event -> membership latency,
full refresh against the bare segment SELECT, and peak RSS during the refresh.

    .venv/bin/python bench/segments.py            # 1M users, 10M events (full scale)
    .venv/bin/python bench/segments.py --quick    # 50k users, 500k events

Data is generated inside the server (MariaDB's sequence engine) so a 10M-event store
takes minutes, not hours. Prints one JSON line per figure. A fresh database is created
and dropped (``--keep`` keeps it).

The full scale runs on a private mariadbd of its own (``--server private``: a datadir
under ``--tmp``, a free port, a buffer pool sized for 10M events), never the shared
server: a small shared buffer pool makes the generator crawl once the events' indexes
outgrow it, and production MariaDB is sized for its data too. ``--quick`` uses the
shared server on 127.0.0.1:3306; ``--server URL`` picks any.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import statistics
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import anyio
import sqlalchemy as sa
from sqlalchemy import func, select

from segflowd.app import Segflow, ago, evaluating_at
from segflowd.bus import Bus
from segflowd.clock import SystemClock
from segflowd.config import load_config
from segflowd.hooks import IngestBatch, MembershipChange, StoredEvent
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import events, users
from segflowd.segments.engine import DRAIN_BATCH, INGEST_TABLES, SegmentService
from segflowd.store import Store
from segflowd.testing import PrivateMariaDB

SERVER = "mysql+aiomysql://root@127.0.0.1:3306"
# The private server of the full scale: the whole data set (~3 GB with indexes) in memory,
# a redo log big enough for 500k-row statements, no binary log.
PRIVATE_OPTIONS = ("--skip-log-bin", "--skip-name-resolve", "--innodb-buffer-pool-size=6G",
                   "--innodb-log-file-size=2G", "--innodb-flush-log-at-trx-commit=2",
                   "--max-allowed-packet=64M")
LATENCY_RATE = 1000.0  # events per second offered in the latency figure
LATENCY_TICK = 0.01  # seconds between producer commits (10 events each at 1k/s)

# Generated data: users u1..uN; events spread over them; created in the last 400 days.
USERS_SQL = sa.text(
    "INSERT INTO users (id, email, attributes, created_at, updated_at) "
    "SELECT CONCAT('u', seq), CONCAT('u', seq, '@example.com'), "
    "JSON_OBJECT('plan', IF(seq % 3 = 0, 'pro', 'free')), "
    ":now - INTERVAL (seq % 400) DAY, :now "
    "FROM seq_1_to_10000000 WHERE seq BETWEEN :lo AND :hi")
EVENTS_SQL = sa.text(
    "INSERT INTO events (user_id, name, attributes, created_at, received_at) "
    "SELECT CONCAT('u', 1 + (seq * 7919) % :users), "
    "ELT(1 + seq % 4, 'purchase', 'login', 'page', 'login'), "
    "JSON_OBJECT('amount', seq % 600), "
    ":now - INTERVAL (seq % 90) DAY - INTERVAL (seq % 86400) SECOND, :now "
    "FROM seq_1_to_10000000 WHERE seq BETWEEN :lo AND :hi")
GEN_CHUNK = 500_000  # rows per generating statement


def make_app() -> Segflow:
    app = Segflow(templates="templates")

    @app.segment("big-spenders")
    def big_spenders():  # type: ignore[no-untyped-def]
        amount = events.c.attributes["amount"].as_float()
        return (select(users.c.id).join(events, events.c.user_id == users.c.id)
                .where(events.c.name == "purchase").group_by(users.c.id)
                .having(func.sum(amount) > 1000))

    app.segment("inactive-users", refresh="15m",
                sql="SELECT user_id AS id FROM events WHERE name = 'login' "
                    "AND user_id IS NOT NULL GROUP BY user_id HAVING MAX(created_at) < :cutoff",
                params={"cutoff": ago(days=30)})

    @app.segment("new-users", refresh="1h")
    def new_users():  # type: ignore[no-untyped-def]
        return select(users.c.id).where(users.c.created_at >= ago(days=7))

    @app.segment("recent-buyers", refresh="1h")
    def recent_buyers():  # type: ignore[no-untyped-def]
        return (select(events.c.user_id).where(events.c.name == "purchase",
                                               events.c.created_at >= ago(days=30))
                .distinct())

    @app.segment("reachable", refresh="1d")
    def reachable():  # type: ignore[no-untyped-def]
        return select(users.c.id).where(users.c.email.is_not(None))

    return app


class CountingSink:
    def __init__(self) -> None:
        self.changes = 0
        self.entered_at: dict[str, float] = {}
        self.expect = 0
        self.all_in = anyio.Event()

    async def membership_changed(self, changes: Sequence[MembershipChange]) -> None:
        self.changes += len(changes)
        t = time.perf_counter()
        for c in changes:
            if c.segment == "big-spenders" and c.entered and c.user_id.startswith("n"):
                self.entered_at.setdefault(c.user_id, t)
        if self.expect and len(self.entered_at) >= self.expect:
            self.all_in.set()


def emit(bench: str, figure: str, value: float, unit: str, baseline: float | None = None,
         target: str | None = None, **extra: object) -> None:
    ratio = round(value / baseline, 3) if baseline else None
    print(json.dumps({"bench": bench, "figure": figure, "value": round(value, 3), "unit": unit,
                      "baseline": None if baseline is None else round(baseline, 3),
                      "ratio": ratio, "target": target, **extra}), flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def generate(store: Store, n_users: int, n_events: int, now: object) -> float:
    t0 = time.perf_counter()
    for lo in range(1, n_users + 1, GEN_CHUNK):
        async with store.begin() as conn:
            await conn.execute(USERS_SQL, {"now": now, "lo": lo,
                                           "hi": min(n_users, lo + GEN_CHUNK - 1)})
    for lo in range(1, n_events + 1, GEN_CHUNK):
        async with store.begin() as conn:
            await conn.execute(EVENTS_SQL, {"now": now, "users": n_users, "lo": lo,
                                            "hi": min(n_events, lo + GEN_CHUNK - 1)})
    async with store.begin() as conn:
        await conn.execute(sa.text("ANALYZE TABLE users, events"))
    return time.perf_counter() - t0


async def main(args: argparse.Namespace) -> None:
    server = args.server or (SERVER if args.quick else "private")
    if server != "private":
        await on_server(server, args)
        return
    private = PrivateMariaDB(Path(args.tmp) / f"segflow-bench-mariadb-{uuid.uuid4().hex[:8]}",
                             options=PRIVATE_OPTIONS)
    try:
        private.install()
        private.start()
        await on_server(private.server_url, args)
    finally:
        private.stop()
        shutil.rmtree(private.folder, ignore_errors=True)


async def on_server(server: str, args: argparse.Namespace) -> None:
    n_users, n_events = (50_000, 500_000) if args.quick else (args.users, args.events)
    name = f"segflow_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(sa.engine.make_url(server).set(
        drivername="mysql+pymysql"), poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text("CREATE DATABASE " + admin.dialect.identifier_preparer.quote(name)
                             + " CHARACTER SET utf8mb4"))
    store = Store.open(str(sa.engine.make_url(server).set(database=name)))
    try:
        await run(store, n_users, n_events, args)
    finally:
        await store.close()
        if not args.keep:
            with admin.connect() as conn:
                conn.execute(sa.text("DROP DATABASE "
                                     + admin.dialect.identifier_preparer.quote(name)))
        admin.dispose()


async def run(store: Store, n_users: int, n_events: int, args: argparse.Namespace) -> None:
    await store.migrate()
    clock = SystemClock()
    now = clock.now()
    gen_s = await generate(store, n_users, n_events, now)
    scale = {"users": n_users, "events": n_events}
    emit("segments", "generate_rows_per_s", (n_users + n_events) / gen_s, "rows/s", **scale)

    cfg = Path(args.tmp) / "segflow-bench.toml"
    cfg.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                   '[providers.outbox]\nplugin = "outbox"\n')
    kernel = Kernel(config=load_config(cfg, environ={}), app=make_app(), store=store,
                    clock=clock, bus=Bus(), metrics=Metrics())
    sink = CountingSink()
    engine = SegmentService(kernel, membership_sinks=[sink])
    await engine.start()

    # Full refresh of the ~all-users segment: first (every user enters), then steady.
    gc.collect()
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    first = await engine.refresh("reachable")
    initial_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    steady = await engine.refresh("reachable")
    steady_s = time.perf_counter() - t0
    rss_refresh = peak_rss_mb()
    seg = engine._segments["reachable"]  # the same compiled SELECT the refresh ran
    t0 = time.perf_counter()
    fetched = 0
    with evaluating_at(clock.now()):
        async with store.connect() as conn:
            result = await conn.stream(seg.query)
            async for part in result.partitions(10_000):
                fetched += len(part)
    bare_s = time.perf_counter() - t0
    emit("segments", "refresh_initial_s", initial_s, "s", baseline=bare_s,
         members=first.size, entered=first.entered, **scale)
    emit("segments", "refresh_steady_s", steady_s, "s", baseline=bare_s, target="<= 1.5x",
         members=steady.size, bare_rows=fetched, **scale)
    emit("segments", "refresh_peak_rss_mb", rss_refresh, "MB", baseline=rss_before,
         target="<= 300 MB", **scale)
    for other in ("big-spenders", "inactive-users", "new-users", "recent-buyers"):
        t0 = time.perf_counter()
        r = await engine.refresh(other)
        emit("segments", f"refresh_initial_s[{other}]", time.perf_counter() - t0, "s",
             members=r.size, **scale)

    # Incremental: a sample of existing users re-evaluated against the 5 segments.
    sample = [f"u{1 + (i * 104729) % n_users}" for i in range(min(args.sample, n_users))]
    engine.ingested(IngestBatch(users=frozenset(sample), events=()))
    t0 = time.perf_counter()
    await engine.drain_once()
    inc_s = time.perf_counter() - t0
    # Baseline: the same narrowed segment SELECTs (what decides membership), bare: one
    # batch of DRAIN_BATCH users at a time, no diff, no writes, no sinks.
    ids = sorted(set(sample))
    evaluated = [s for s in engine._segments.values() if s.reads_any(INGEST_TABLES)]
    t0 = time.perf_counter()
    with evaluating_at(clock.now()):
        async with store.connect() as conn:
            for lo in range(0, len(ids), DRAIN_BATCH):
                for s in evaluated:
                    (await conn.execute(s.among(ids[lo:lo + DRAIN_BATCH]))).all()
    bare_inc_s = time.perf_counter() - t0
    emit("segments", "incremental_users_per_s", len(ids) / inc_s, "users/s",
         baseline=len(ids) / bare_inc_s, target=">= 10000", segments=len(evaluated),
         batch=len(ids), **scale)

    # Latency: new users each committing a purchase of 2000 at 1k events/s; time from
    # commit to the big-spenders entry reaching the sink, with the engine running.
    commits: dict[str, float] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        per_tick = max(1, round(LATENCY_RATE * LATENCY_TICK))
        total = int(LATENCY_RATE * args.latency_seconds)
        start = time.perf_counter()
        for i in range(0, total, per_tick):
            ids = [f"n{j}" for j in range(i, min(total, i + per_tick))]
            ts = clock.now()
            async with store.begin() as conn:
                await conn.execute(sa.insert(users), [
                    {"id": u, "email": f"{u}@example.com", "attributes": {},
                     "created_at": ts, "updated_at": ts} for u in ids])
                res = await conn.execute(sa.insert(events), [
                    {"user_id": u, "name": "purchase", "attributes": {"amount": 2000},
                     "created_at": ts, "received_at": ts} for u in ids])
            first_id = int(res.lastrowid or 0)  # MySQL: the first id of a multi-row insert
            t = time.perf_counter()
            for u in ids:
                commits[u] = t
            engine.ingested(IngestBatch(users=frozenset(ids), events=tuple(
                StoredEvent(id=first_id + k, user_id=u, anonymous_id=None, name="purchase",
                            attributes={"amount": 2000}, created_at=ts, received_at=ts)
                for k, u in enumerate(ids))))
            await anyio.sleep(max(0.0, start + (i + per_tick) / LATENCY_RATE
                                  - time.perf_counter()))
        sink.expect = len(commits)
        if len(sink.entered_at) >= sink.expect:
            sink.all_in.set()
        with anyio.move_on_after(30):
            await sink.all_in.wait()
        tg.cancel_scope.cancel()
    lat = sorted((sink.entered_at[u] - commits[u]) * 1000 for u in commits
                 if u in sink.entered_at)
    if lat:
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        emit("segments", "event_to_entry_p99_ms", p99, "ms", target="<= 100",
             p50_ms=round(statistics.median(lat), 2), offered=len(commits),
             delivered=len(lat), rate_per_s=LATENCY_RATE, **scale)
    else:
        emit("segments", "event_to_entry_p99_ms", float("nan"), "ms", target="<= 100",
             delivered=0)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="50k users / 500k events")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--sample", type=int, default=20_000, help="users in the incremental run")
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument("--server", default=None,
                   help=f"'private' (the full scale's default) or a URL ({SERVER}, the "
                        "--quick default)")
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--keep", action="store_true", help="keep the generated database")
    anyio.run(main, p.parse_args())
