"""Flow engine benchmarks on MariaDB (or SQLite, or both); one JSON line per figure.

    .venv/bin/python bench/flows.py            # full: 1M waiting instances, 1M wheel timers
    .venv/bin/python bench/flows.py --quick    # 50k waiting instances, 200k wheel timers
    .venv/bin/python bench/flows.py --quick --store both

Figures (baseline measured in the same run):
  start_to_ready     FlowService start (versions, wheel rebuilt, loader) with N waiting
                     instances in the store; baseline: the same start on an empty store
  rss                process RSS after that start (target <= 250 MB at 1M); baseline: before
  wake_to_send       instances per second woken from a wait and stepped through send_email
                     (outbox row committed; delivery is not part of it) and into their next
                     wait; baseline: the same three writes as bare transactions, no engine
  lateness_p99       p99 of (send committed - wake_at) with 1k waits falling due per second
                     (target <= 1 s), the first one due after the service is ready (a
                     restart's own delay is start_to_ready); baseline: p99 overshoot of a
                     bare anyio.sleep
  wheel_*            the timer wheel against a heapq with lazy cancellation, same timers

On MariaDB the store is a scratch database on ``$SEGFLOW_BENCH_MARIADB`` (default
root@127.0.0.1:3306), created and dropped by the run; on SQLite a temporary file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa
import structlog
from _stores import KINDS, store_url  # bench/ is on sys.path when run as a script

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.clock import SystemClock
from segflowd.config import load_config
from segflowd.flows.runtime import Command
from segflowd.flows.service import FlowService
from segflowd.flows.wheel import TimerWheel
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import flow_instances, flow_journal, messages, users
from segflowd.store import Store

STORE_KIND = ["mariadb"]  # the store of the figures being measured (emit adds it)
WAIT_HASH = Command("wait", None, {"seconds": 86400.0}).hash


def emit(bench: str, figure: str, value: float, unit: str, baseline: float | None,
         target: str | None) -> None:
    ratio = None if not baseline else round(value / baseline, 3)
    store = STORE_KIND[0] if bench == "flows" else "none"  # the wheel runs in memory
    print(json.dumps({"bench": bench, "figure": figure, "store": store,
                      "value": round(value, 4), "unit": unit,
                      "baseline": None if baseline is None else round(baseline, 4),
                      "ratio": ratio, "target": target}), flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_app() -> Segflow:
    app = Segflow(templates=tempfile.gettempdir())
    app.segment("all", sql="SELECT id FROM users")

    @app.campaign("bench", segments=["all"])
    def bench_flow(ctx: Any, rt: Any) -> Any:
        yield rt.wait(days=1)
        yield rt.send_email("hello", n=1)
        yield rt.wait(days=1)

    return app


def kernel(store: Store, app: Segflow, tmp: Path) -> Kernel:
    cfg = tmp / "segflow.toml"
    cfg.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "null"\n'
                   '[providers.null]\nplugin = "outbox"\n')
    return Kernel(config=load_config(cfg, environ={}), app=app, store=store,
                  clock=SystemClock(), bus=Bus(), metrics=Metrics())


async def seed(store: Store, version: str, n: int, wake: Any, start_id: int,
               chunk: int = 5000) -> None:
    """n waiting instances (journal: one wait), wake_at = wake(i)."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        ids = range(start_id + lo, start_id + hi)
        async with store.begin() as conn:
            await conn.execute(sa.insert(users), [
                {"id": f"u{i}", "email": f"u{i}@example.com", "attributes": {"n": i},
                 "created_at": now, "updated_at": now} for i in ids])
            await conn.execute(sa.insert(flow_instances), [
                {"id": i, "campaign": "bench", "user_id": f"u{i}", "version": version,
                 "status": "waiting", "live": 1, "seq": 1, "wake_at": wake(i - start_id),
                 "created_at": now, "updated_at": now} for i in ids])
            await conn.execute(sa.insert(flow_journal), [
                {"instance_id": i, "seq": 0, "kind": "wait", "name": None,
                 "args_hash": WAIT_HASH, "result": None, "reads": None, "created_at": now}
                for i in ids])


async def count_messages(store: Store) -> int:
    async with store.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(messages)))
                   .scalar() or 0)


async def run_service(k: Kernel, body: Any) -> tuple[FlowService, float, Any]:
    svc = FlowService(k)
    out: Any = None
    async with anyio.create_task_group() as tg:
        t0 = time.perf_counter()
        await tg.start(svc.run)
        ready = time.perf_counter() - t0
        out = await body(svc)
        tg.cancel_scope.cancel()
    return svc, ready, out


async def bench_store(kind: str, n: int, due: int, rate: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as folder, store_url(kind, Path(folder)) as url:
        STORE_KIND[0] = kind
        store = Store.open(url, pool_size=10)
        try:
            await bench_on(store, Path(folder), n, due, rate, seconds)
        finally:
            await store.close()


async def bench_on(store: Store, tmp: Path, n: int, due: int, rate: int,
                   seconds: float) -> None:
    await store.migrate()
    app = make_app()
    version = app.campaigns["bench"].version
    k = kernel(store, app, tmp)

    async def nothing(svc: FlowService) -> None:
        return None

    _, empty_ready, _ = await run_service(k, nothing)
    far = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(days=3)
    t = time.perf_counter()
    await seed(store, version, n, lambda i: far + dt.timedelta(seconds=i % 86400), 1)
    seeding = time.perf_counter() - t
    print(f"# seeded {n} waiting instances in {seeding:.1f} s", file=sys.stderr)
    rss0 = rss_mb()
    _, ready, _ = await run_service(kernel(store, app, tmp), nothing)
    rss1 = rss_mb()
    emit("flows", "start_to_ready", ready, "s", empty_ready, None)
    emit("flows", "rss", rss1, "MB", rss0, "<= 250 MB at 1M waiting")

    # wake -> send_email -> wait, for `due` overdue instances
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    await seed(store, version, due, lambda i: now - dt.timedelta(seconds=1), n + 1)

    async def drain_sends(svc: FlowService) -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        while await count_messages(store) < due:  # noqa: ASYNC110 - polls the store
            await anyio.sleep(0.05)
        await svc.settle(600)
        took = time.perf_counter() - t0
        print(f"# wake_to_send: {due} instances in {took:.2f} s, "
              f"{(time.process_time() - c0) / due * 1e6:.0f} us of this process's CPU each",
              file=sys.stderr)
        return took

    _, _, took = await run_service(kernel(store, app, tmp), drain_sends)
    base_rate = await bare_steps(store, min(due, 2000), n + due + 1)
    emit("flows", "wake_to_send", due / took, "instances/s", base_rate,
         ">= 5000 steps/s")
    emit("flows", "step_transactions", 2 * due / took, "steps/s", 2 * base_rate, None)

    # lateness at `rate` due per second, for `seconds`. The first wait falls due after
    # the seeding below and the service's start (both estimated from the runs above, with
    # room to spare): a wait due before the service is ready measures the start, which
    # start_to_ready reports, not the scheduler.
    total = int(rate * seconds)
    margin = 2.0 * (total * seeding / max(n, 1) + ready) + 3.0
    start = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=margin)
    first = n + due + 10_000
    await seed(store, version, total,
               lambda i: start + dt.timedelta(seconds=i / rate), first)
    before = await count_messages(store)

    slack: list[float] = []  # seconds from the service being ready to the first wait

    async def wait_all(svc: FlowService) -> None:
        slack.append((start - dt.datetime.now(dt.UTC).replace(tzinfo=None)).total_seconds())
        with anyio.fail_after(max(0.0, slack[0]) + seconds + 120):
            while await count_messages(store) < before + total:  # noqa: ASYNC110 - polls
                await anyio.sleep(0.1)

    await run_service(kernel(store, app, tmp), wait_all)
    wake_of: dict[int, float] = {}  # lateness by instance; wake_at follows from its id
    async with store.connect() as conn:
        for iid, created in await conn.execute(
                sa.select(messages.c.instance_id, messages.c.created_at)
                .where(messages.c.instance_id >= first)):
            wake_of[int(iid)] = (created - (start + dt.timedelta(
                seconds=(int(iid) - first) / rate))).total_seconds()
    late = sorted(wake_of.values())
    p99 = late[int(len(late) * 0.99)] if late else float("nan")
    if late:
        print(f"# lateness: p50 {late[len(late) // 2]:.3f} s, max {late[-1]:.3f} s; the "
              f"first wait fell due {slack[0]:.1f} s after the service was ready",
              file=sys.stderr)
    emit("flows", "lateness_p99", p99, "s", await sleep_overshoot(), "<= 1 s")


async def bare_steps(store: Store, m: int, first: int) -> float:
    """The same writes as a wake -> send -> wait, as bare transactions (instances/s)."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    await seed(store, "x", m, lambda i: now + dt.timedelta(days=9), first)
    sem = anyio.Semaphore(8)

    async def one(i: int) -> None:
        async with sem:
            async with store.begin() as conn:
                await conn.execute(sa.insert(flow_journal).values(
                    instance_id=i, seq=1, kind="send_email", name="hello", args_hash="x",
                    result=None, reads=None, created_at=now))
                await conn.execute(sa.update(flow_instances).where(
                    flow_instances.c.id == i).values(seq=2, status="running"))
                await conn.execute(sa.insert(messages).values(
                    user_id=f"u{i}", kind="campaign", template="hello", status="queued",
                    attempts=0, dedupe_key=f"bare:{i}", created_at=now, updated_at=now))
            async with store.begin() as conn:
                await conn.execute(sa.insert(flow_journal).values(
                    instance_id=i, seq=2, kind="wait", name=None, args_hash="x",
                    result=None, reads=None, created_at=now))
                await conn.execute(sa.update(flow_instances).where(
                    flow_instances.c.id == i).values(seq=3, status="waiting"))

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(first, first + m):
            tg.start_soon(one, i)
    rate = m / (time.perf_counter() - t0)
    async with store.begin() as conn:  # leave no trace for the other figures
        await conn.execute(sa.delete(messages).where(messages.c.dedupe_key.like("bare:%")))
        await conn.execute(sa.delete(flow_instances).where(flow_instances.c.version == "x"))
    return rate


async def sleep_overshoot(n: int = 200) -> float:
    over = []
    for _ in range(n):
        t0 = time.perf_counter()
        await anyio.sleep(0.005)
        over.append(time.perf_counter() - t0 - 0.005)
    over.sort()
    return over[int(n * 0.99)]


def bench_wheel(n: int) -> None:
    rng = random.Random(42)
    deadlines = [rng.uniform(0, 3600.0) for _ in range(n)]
    cancel = rng.sample(range(n), n // 10)

    t0 = time.perf_counter()
    w = TimerWheel(0.0)
    for i, d in enumerate(deadlines):
        w.add(i, d)
    w_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in cancel:
        w.cancel(i)
    w_cancel = time.perf_counter() - t0
    t0 = time.perf_counter()
    fired_w = 0
    for s in range(1, 3602):
        fired_w += len(w.advance(float(s)))
    w_adv = time.perf_counter() - t0

    t0 = time.perf_counter()
    heap: list[tuple[float, int]] = []
    live: dict[int, float] = {}
    for i, d in enumerate(deadlines):
        heapq.heappush(heap, (d, i))
        live[i] = d
    h_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in cancel:
        live.pop(i, None)  # lazy: the entry stays in the heap until popped
    h_cancel = time.perf_counter() - t0
    t0 = time.perf_counter()
    fired_h = 0
    for s in range(1, 3602):
        while heap and heap[0][0] <= s:
            d, i = heapq.heappop(heap)
            if live.get(i) == d:
                del live[i]
                fired_h += 1
    h_adv = time.perf_counter() - t0
    assert fired_w == fired_h == n - len(cancel), (fired_w, fired_h)
    emit("wheel", f"add_{n}", n / w_add, "ops/s", n / h_add, None)
    emit("wheel", f"cancel_{len(cancel)}", len(cancel) / w_cancel, "ops/s",
         len(cancel) / h_cancel, None)
    emit("wheel", f"advance_fire_{fired_w}", fired_w / w_adv, "timers/s", fired_h / h_adv, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small scale (50k instances)")
    p.add_argument("--store", choices=(*KINDS, "both"), default="mariadb")
    p.add_argument("--instances", type=int, metavar="N",
                   help="waiting instances seeded (default 50k quick, 1M full)")
    p.add_argument("--due", type=int, metavar="N",
                   help="overdue instances stepped for wake_to_send (default 5k / 50k)")
    p.add_argument("--seconds", type=float, metavar="S",
                   help="length of the lateness run at 1k due/s (default 5 / 30)")
    p.add_argument("--no-wheel", action="store_true", help="skip the wheel vs heapq figures")
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30),
                        cache_logger_on_first_use=True)  # as the daemon configures it
    n, due, wheel_n = (50_000, 5_000, 200_000) if args.quick else (1_000_000, 50_000, 1_000_000)
    n = n if args.instances is None else args.instances
    due = due if args.due is None else args.due
    seconds = (5.0 if args.quick else 30.0) if args.seconds is None else args.seconds
    for kind in KINDS if args.store == "both" else (args.store,):
        anyio.run(bench_store, kind, n, due, 1000, seconds)
    if not args.no_wheel:  # last: its million timers would stay in the rss figure
        bench_wheel(wheel_n)


if __name__ == "__main__":
    main()
