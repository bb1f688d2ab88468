"""Channel throughput: email, SMS and webhook calls handed to local servers, apart and at once.

    .venv/bin/python bench/channels.py            # full: 5,000 per channel, ~3.5 min
    .venv/bin/python bench/channels.py --quick    # 800 per channel, under a minute
    .venv/bin/python bench/channels.py --quick --only sms --profile FILE  # cProfile
    .venv/bin/python bench/channels.py --sms-workers 1 --webhook-calls 8  # other options

The real :class:`~segflowd.delivery.service.DeliveryService` (an email lane and an SMS
lane) and :class:`~segflowd.delivery.outcallservice.OutcallService` run in this process on
a SQLite store in a temp folder. Users (email and phone) are inserted first and the rows
queued with :func:`~segflowd.delivery.outbox.enqueue_many`; a phase's clock starts when
its services start and stops, per channel, when every row of it is final. The receivers
are one uvicorn process (httptools, uvloop, a raw ASGI app, no access log) that answers
as Postmark (``/email/batch``), Twilio (``/2010-04-01/Accounts/{sid}/Messages.json``:
201 ``{"sid": "SM<n>", "status": "queued"}``) and a webhook receiver (200 JSON) do; its
CPU is read from ``/proc`` and shown apart (``server_cpu_s``), so a reader can see it was
not the bottleneck. Provider options are set for throughput: ``rate = 0`` on both
providers, ``[providers.sms] concurrency = 4`` and ``max_batch = 100`` (the ``twilio``
plugin makes up to 10 calls at once per worker), ``[webhooks] concurrency = 64``.

Beside each figure: the client's CPU seconds for the phase (``client_cpu_s``, every
thread; ``client_store_threads_cpu_s``, the aiosqlite threads alone), the receivers'
(``server_cpu_s``), the store's commits per message of the phase and the SQLite
connections its pool opened. ``--profile`` covers the event loop's thread only.

Figures (one JSON line each):

* ``email_per_s``, ``sms_per_s``, ``webhook_calls_per_s``: each channel alone. Targets
  (issue #19): SMS and webhooks >= 1,000/s on a 2-core machine; no baseline.
* ``email_per_s_all``, ``sms_per_s_all``, ``webhook_calls_per_s_all``: the three queued
  together and run at once; baseline: the channel alone in the same run. Target for
  email: ratio >= 0.95 (unchanged within 5 %).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa
from _stores import store_url  # bench/ is on sys.path when run as a script

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.clock import SystemClock
from segflowd.config import load_config
from segflowd.delivery.outbox import Channel, Queued, enqueue_many
from segflowd.delivery.outcallservice import OutcallService
from segflowd.delivery.service import DeliveryService
from segflowd.kernel import Kernel
from segflowd.logs import configure_logging
from segflowd.metrics import Metrics
from segflowd.schema import messages, users
from segflowd.store import Store

TARGET_SMS = 1000.0  # SMS/s handed to a local Twilio-shaped server (issue #19)
TARGET_WEBHOOK = 1000.0  # webhook calls/s to a local receiver (issue #19)
TARGET_EMAIL_RATIO = 0.95  # email's rate with all channels running, against alone
FINAL = ("sent", "failed", "suppressed", "unknown")
PHASE_TIMEOUT = 120.0  # seconds a phase may take before the bench gives up
QUICK_N = 800  # messages per channel with --quick
FULL_N = 5000  # messages per channel
SMS_WORKERS = 4  # [providers.sms] concurrency
WEBHOOK_CALLS = 64  # [webhooks] concurrency
ACCOUNT = "AC" + "0" * 32
TEMPLATE = "<html><body><p>Hello {{ user.name }}, you have {{ points }} points.</p>" \
           '<a href="https://example.com/x">open</a></body></html>'

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# -- the receivers (a process of their own) ------------------------------------------------

_count = 0


async def receiver(scope: Scope, receive: Receive, send: Send) -> None:
    """Postmark's batch, Twilio's Messages and a webhook receiver, by path."""
    global _count
    if scope["type"] != "http":  # no lifespan: uvicorn runs with lifespan="off"
        return
    body = b""
    more = True
    while more:
        event = await receive()
        body += event.get("body", b"")
        more = event.get("more_body", False)
    path: str = scope["path"]
    status = 200
    if path == "/email/batch":
        n = len(json.loads(body))
        answer = json.dumps([{"ErrorCode": 0, "Message": "OK", "MessageID": f"m{i}"}
                             for i in range(n)]).encode()
    elif path.endswith("/Messages.json"):
        _count += 1
        status, answer = 201, b'{"sid": "SM%d", "status": "queued"}' % _count
    else:
        answer = b'{"ok": true}'
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(receiver, host="127.0.0.1", port=port, http="httptools", loop="uvloop",
                access_log=False, log_level="warning", lifespan="off")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def receivers() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the local receivers did not start") from None
                time.sleep(0.05)
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, float]:
    """CPU seconds so far of each thread of this process but the main one (aiosqlite runs
    each SQLite connection on a thread of its own: the store's share of the work)."""
    out: dict[int, float] = {}
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


# -- the daemon's side ---------------------------------------------------------------------

def kernel(store: Store, folder: Path, port: int, sms_workers: int, calls: int) -> Kernel:
    (folder / "hello.html").write_text(TEMPLATE)
    app = Segflow(templates=folder)
    app.template("hello", subject="Hello {{ user.name }}", html="hello.html")
    app.sms_template("remind", text="Hi {{ user.name }}, your code is {{ points }}.")
    base = f"http://127.0.0.1:{port}"
    cfg = folder / "segflow.toml"
    cfg.write_text(f"""
[daemon]
app = "app.py:app"
[http]
public_url = "https://mail.example.com"
[email]
from = "hi@example.com"
provider = "postmark"
secret = "bench-secret"
[providers.postmark]
plugin = "postmark"
server_token = "t"
base_url = "{base}"
rate = 0
[sms]
provider = "sms"
[providers.sms]
plugin = "twilio"
account_sid = "{ACCOUNT}"
auth_token = "t"
from = "+14155550100"
base_url = "{base}"
rate = 0
concurrency = {sms_workers}
max_batch = 100
[webhooks]
allow = ["{base}/*"]
concurrency = {calls}
""")
    return Kernel(config=load_config(cfg, environ={}), app=app, store=store,
                  clock=SystemClock(), bus=Bus(), metrics=Metrics())


def phone(i: int) -> str:
    return f"+1415{2000000 + i:07d}"


async def seed_users(k: Kernel, n: int) -> None:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    async with k.store.begin() as conn:
        await conn.execute(sa.insert(users), [
            {"id": f"u{i}", "email": f"u{i}@example.org",
             "attributes": {"name": f"User {i}", "phone": phone(i)},
             "created_at": now, "updated_at": now} for i in range(n)])


async def queue(k: Kernel, port: int, tag: str, counts: Mapping[Channel, int]) -> None:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    items: list[Queued] = []
    for channel, n in counts.items():
        for i in range(n):
            key = f"bench:{tag}:{channel}:{i}"
            if channel == "email":
                items.append(Queued(kind="campaign", template="hello", user_id=f"u{i}",
                                    dedupe_key=key, data={"points": i}))
            elif channel == "sms":
                items.append(Queued(kind="campaign", template="remind", user_id=f"u{i}",
                                    dedupe_key=key, data={"points": i}, channel="sms"))
            else:
                items.append(Queued(
                    kind="campaign", template="webhook", user_id=f"u{i}", dedupe_key=key,
                    channel="webhook", data={"url": f"http://127.0.0.1:{port}/hook/{i}",
                                             "method": "POST", "json": {"user": i}}))
    async with k.store.begin() as conn:
        await enqueue_many(conn, items, now=now, look_up=False)


async def final_counts(k: Kernel, tag: str) -> dict[str, dict[str, int]]:
    """Rows of phase ``tag`` by channel and status."""
    out: dict[str, dict[str, int]] = {}
    async with k.store.connect() as conn:
        for channel, status, n in (await conn.execute(
                sa.select(messages.c.channel, messages.c.status, sa.func.count())
                .where(messages.c.dedupe_key.like(f"bench:{tag}:%"))
                .group_by(messages.c.channel, messages.c.status))).all():
            out.setdefault(str(channel), {})[str(status)] = int(n)
    return out


async def phase(k: Kernel, port: int, server_pid: int, tag: str,
                counts: Mapping[Channel, int], commits: list[int]) -> dict[str, Any]:
    """Queue ``counts``, run the services until every row is final; seconds per channel
    (from the services' start), this process's CPU and the receivers' CPU."""
    await queue(k, port, tag, counts)
    delivery = DeliveryService(k)
    outcalls = OutcallService(k)
    lanes = {lane.channel: lane for lane in delivery.lanes}

    def done(channel: str) -> int:
        if channel == "webhook":
            s = outcalls.statistics()
            return s.answered + s.failed
        c = lanes[channel].outcomes.counters
        return c.sent + c.failed

    seconds: dict[str, float] = {}
    srv0, cpu0, (commits0, connects0) = cpu_seconds(server_pid), time.process_time(), commits
    threads0 = thread_cpu()
    t0 = time.perf_counter()
    with anyio.fail_after(PHASE_TIMEOUT):
        async with anyio.create_task_group() as tg:
            if "email" in counts or "sms" in counts:
                await tg.start(delivery.run)
            if "webhook" in counts:
                await tg.start(outcalls.run)
            while len(seconds) < len(counts):
                for channel, n in counts.items():
                    if channel not in seconds and done(channel) >= n:
                        seconds[channel] = time.perf_counter() - t0
                await anyio.sleep(0.005)
            wall = time.perf_counter() - t0
            cpu, srv = time.process_time() - cpu0, cpu_seconds(server_pid) - srv0
            committed, connects = commits[0] - commits0, commits[1] - connects0
            threads = sum(c - threads0.get(t, 0.0) for t, c in thread_cpu().items())
            if "email" in counts or "sms" in counts:
                await delivery.drain()
            if "webhook" in counts:
                await outcalls.drain()
    found = await final_counts(k, tag)
    for channel, n in counts.items():
        sent = found.get(channel, {}).get("sent", 0)
        if sent != n:
            raise RuntimeError(f"phase {tag}: {channel}: {sent} of {n} sent ({found[channel]})")
    return {"seconds": seconds, "wall": wall, "cpu": cpu, "server_cpu": srv,
            "commits": committed, "messages": sum(counts.values()), "threads": threads,
            "connects": connects}


def emit(figure: str, n: int, channel: str, unit: str, run: Mapping[str, Any],
         baseline: float | None, target: float | None) -> float:
    """Print one figure; return its value (messages or calls per second)."""
    seconds = float(run["seconds"][channel])
    value = n / seconds
    print(json.dumps({
        "bench": "channels", "figure": figure, "value": round(value, 1), "unit": unit,
        "baseline": None if baseline is None else round(baseline, 1),
        "ratio": round(value / baseline, 3) if baseline else None, "target": target,
        "messages": n, "seconds": round(seconds, 3),
        "client_cpu_s": round(run["cpu"], 2), "client_store_threads_cpu_s": round(
            run["threads"], 2), "server_cpu_s": round(run["server_cpu"], 2),
        "phase_wall_s": round(run["wall"], 3),
        # Store commits of the whole phase (every channel in it) per message of it.
        "commits_per_message": round(run["commits"] / run["messages"], 2),
        # SQLite connections the store's pool opened during the phase (each: a thread).
        "store_connects": run["connects"]}), flush=True)
    return value


FIGURES: dict[Channel, tuple[str, str, float | None]] = {
    "email": ("email_per_s", "messages/s", None),
    "sms": ("sms_per_s", "messages/s", TARGET_SMS),
    "webhook": ("webhook_calls_per_s", "calls/s", TARGET_WEBHOOK)}


async def main(n: int, only: tuple[Channel, ...], profile: cProfile.Profile | None,
               sms_workers: int, calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, store_url("sqlite", Path(tmp)) as url, \
            receivers() as (port, server):
        store = Store.open(url, pool_size=4)
        commits = [0, 0]  # store commits, store connections opened

        def count(_conn: object) -> None:
            commits[0] += 1

        def connected(_dbapi: object, _record: object) -> None:
            commits[1] += 1

        sa.event.listen(store.engine.sync_engine, "commit", count)
        sa.event.listen(store.engine.sync_engine, "connect", connected)
        try:
            await store.migrate()
            k = kernel(store, Path(tmp), port, sms_workers, calls)
            await seed_users(k, n)
            await phase(k, port, server.pid, "warm", dict.fromkeys(only, min(n, 200)),
                        commits)
            if profile is not None:
                profile.enable()
            alone: dict[str, float] = {}
            for channel in only:
                run = await phase(k, port, server.pid, channel, {channel: n}, commits)
                figure, unit, target = FIGURES[channel]
                alone[channel] = emit(figure, n, channel, unit, run, None, target)
            if len(only) > 1:
                run = await phase(k, port, server.pid, "all", dict.fromkeys(only, n), commits)
                for channel in only:
                    figure, unit, target = FIGURES[channel]
                    emit(f"{figure}_all", n, channel, unit, run, alone[channel],
                         TARGET_EMAIL_RATIO if channel == "email" else target)
            if profile is not None:
                profile.disable()
        finally:
            await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_N:,} per channel, not {FULL_N:,}")
    parser.add_argument("--only", default=",".join(FIGURES),
                        help="comma-separated channels (email, sms, webhook); all by default")
    parser.add_argument("--profile", metavar="FILE",
                        help="write a cProfile of the measured phases (this process) to FILE")
    parser.add_argument("--sms-workers", type=int, default=SMS_WORKERS,
                        help="[providers.sms] concurrency: delivery workers of the SMS lane")
    parser.add_argument("--webhook-calls", type=int, default=WEBHOOK_CALLS,
                        help="[webhooks] concurrency: webhook calls in flight")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        sys.exit(0)
    configure_logging("console", "warning")  # stdout carries only the JSON figures
    prof = cProfile.Profile() if args.profile else None
    chosen = tuple(c.strip() for c in args.only.split(",") if c.strip())
    unknown = [c for c in chosen if c not in FIGURES]
    if unknown or not chosen:
        parser.error(f"--only: unknown channel(s) {', '.join(unknown)} (email, sms, webhook)")
    anyio.run(main, QUICK_N if args.quick else FULL_N,
              typing.cast(tuple[Channel, ...], chosen), prof, args.sms_workers,
              args.webhook_calls)
    if prof is not None:
        prof.dump_stats(args.profile)
    sys.exit(0)
