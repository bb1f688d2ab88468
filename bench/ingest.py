"""Ingest throughput and latency against a running segflowd, with same-run baselines.

    .venv/bin/python bench/ingest.py            # full: 15 s per phase, 64 connections
    .venv/bin/python bench/ingest.py --quick    # 3 s per phase, 32 connections
    .venv/bin/python bench/ingest.py --stores sqlite
    .venv/bin/python bench/ingest.py --quick --ingest-only   # no engines consuming ingest

For each store (SQLite file, fresh MariaDB database) it measures, in one run:

* ``single_rps``: single-event ``POST /v1/users/{id}/events`` requests/s, against the
  baseline of a bare raw-ASGI app answering 202 under the same uvicorn settings
  (target ≥ 0.6x); ``p50_ms`` / ``p99_ms`` beside the baseline's.
* ``batch_events_per_s``: events/s through Segment ``/v1/batch`` (100 per request),
  against the rows/s of a raw bulk insert into the same store's events table
  (target ≥ 0.5x).
* ``acked_events_stored``: every event acknowledged with a 2xx is in the store (1.0x).
* ``browser_server_cpu_us``: server CPU per single Segment track as analytics.js sends it
  (``POST /v1/t``, ``Origin``, ``text/plain``, ``writeKey`` in the body, CORS headers in
  the answer), against ``POST /v1/track`` with Basic auth and JSON in the same daemon,
  their phases alternated (target ≤ 1.05x: the browser path costs at most 5% more).
* ``single_rps_no_store`` / ``single_server_cpu_us_no_store`` (with ``--ingest-only``,
  once, before the stores):
  the same single-event requests through segflowd's ingest with a committer that answers
  each flush without touching the store. Against the bare app this is the floor of what
  HTTP routing, auth, parsing, validation and the wait for the flush cost; the rest of
  ``single_server_cpu_us`` is the store's.
* ``single_server_cpu_us`` / ``batch_server_cpu_us``: the server process's CPU time
  (``/proc``, all threads) per request / per event, beside the bare app's per request.
  Unlike requests/s it does not depend on how much of the machine the load generator
  and other processes leave the server; ``server_busy`` and ``client_busy`` (CPU
  seconds per second) on the rate lines tell which side set the pace.

The servers run as subprocesses; the load comes from this process over loopback with a
small keep-alive HTTP/1.1 client on raw asyncio streams (no client library in the way).
Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

SECRET = "bench-secret"
MARIADB = os.environ.get("SEGFLOW_TEST_MARIADB", "mysql+aiomysql://root@127.0.0.1:3306")
BATCH_SIZE = 100  # events per /v1/batch request
RAW_CHUNK = 1000  # rows per transaction in the raw bulk insert baseline
BROWSER_ROUNDS = 2  # alternations of /v1/track and /v1/t phases
START_TIMEOUT = 30.0  # seconds


# -- the baseline server -------------------------------------------------------------


async def bare_app(scope: dict[str, Any], receive: Callable[[], Any],
                   send: Callable[[dict[str, Any]], Any]) -> None:
    """Reads the body, answers 202 with a tiny JSON body: the floor of raw ASGI."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = b'{"id":1,"duplicate":false}'
    await send({"type": "http.response.start", "status": 202,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve_baseline(port: int) -> None:
    import uvicorn

    # The same settings segflowd's daemon gives uvicorn (segflowd/daemon.py _serve_http).
    uvicorn.run(bare_app, host="127.0.0.1", port=port, log_config=None, lifespan="off",
                access_log=False, http="httptools", server_header=False, date_header=True)


def serve_ingest_only(config_path: str, *, no_store: bool = False) -> None:
    """segflowd with the ingest service alone: what ingest costs without the engines.

    ``no_store``: the group committer answers every flush without touching the store
    (each event "new", id 0). Everything else (uvicorn, routing, auth, parsing,
    validation, the committer's queue and the wait for the flush) runs as in segflowd:
    this measures the floor under the single-event figure, what is left for the store.
    """
    import anyio

    from segflowd.cli.commands import _load
    from segflowd.daemon import Daemon
    from segflowd.hooks import IngestBatch
    from segflowd.ingest.committer import GroupCommitter
    from segflowd.ingest.service import IngestService
    from segflowd.ingest.writes import CommitResult, EventWrite, Write

    if no_store:
        async def answer(self: GroupCommitter, groups: list[list[Write]]
                         ) -> tuple[list[CommitResult], IngestBatch]:
            results = [CommitResult(tuple(0 for w in g if isinstance(w, EventWrite)),
                                    tuple(False for w in g if isinstance(w, EventWrite)),
                                    ()) for g in groups]
            return results, IngestBatch(users=frozenset(), events=(), deleted=frozenset())

        GroupCommitter._commit_once = answer  # type: ignore[method-assign,assignment]
    config, app = _load(config_path)
    daemon = Daemon(config, app, services=[])
    daemon.services = [IngestService(daemon.kernel)]
    anyio.run(daemon.run, backend="asyncio", backend_options={"use_uvloop": True})


# -- a small load generator ----------------------------------------------------------


class Load:
    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.latencies: list[float] = []
        self.acked_events = 0
        self.server_cpu: float | None = None  # seconds of the server's CPU under this load
        self.client_cpu = 0.0  # seconds of this process's CPU (the load generator)

    def cpu_us_per_request(self) -> float | None:
        """Server CPU per answered request: what the server costs, whoever limits the rate."""
        if self.server_cpu is None or not self.ok + self.failed:
            return None
        return self.server_cpu / (self.ok + self.failed) * 1e6


async def _connection(port: int, make: Callable[[int], tuple[bytes, int]], deadline: float,
                      load: Load, counter: Iterator[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            request, events = make(next(counter))
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            load.latencies.append(time.perf_counter() - t0)
            if 200 <= status < 300:
                load.ok += 1
                load.acked_events += events
            else:
                load.failed += 1
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _request(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *[f"{k}: {v}" for k, v in headers.items()]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def run_load(port: int, make: Callable[[int], tuple[bytes, int]], seconds: float,
             connections: int, pid: int | None = None) -> tuple[Load, float]:
    """Closed-loop load for ``seconds``; with ``pid``, the server's CPU time is measured."""
    load = Load()
    counter = iter(range(10**12))
    cpu_before = cpu_seconds(pid) if pid else None
    own_before = time.process_time()
    try:
        return load, _drive(port, make, seconds, connections, load, counter)
    finally:
        load.client_cpu = time.process_time() - own_before
        cpu_after = cpu_seconds(pid) if pid else None
        if cpu_before is not None and cpu_after is not None:
            load.server_cpu = cpu_after - cpu_before


def _drive(port: int, make: Callable[[int], tuple[bytes, int]], seconds: float,
           connections: int, load: Load, counter: Iterator[int]) -> float:

    async def main() -> float:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*[_connection(port, make, deadline, load, counter)
                               for _ in range(connections)])
        return time.perf_counter() - started

    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def single_event(run_id: str) -> Callable[[int], tuple[bytes, int]]:
    auth = {"Authorization": f"Bearer {SECRET}"}

    def make(i: int) -> tuple[bytes, int]:
        body = json.dumps({"name": "bench.single", "id": f"{run_id}-{i}",
                           "attributes": {"amount": i % 100, "plan": "pro"}}).encode()
        return _request("POST", f"/v1/users/user-{i % 5000}/events", body, auth), 1

    return make


def segment_single(run_id: str, *, browser: bool) -> Callable[[int], tuple[bytes, int]]:
    """One Segment track per request: server-side (``/v1/track``) or as a browser sends it."""
    import base64

    basic = {"Authorization": "Basic " + base64.b64encode(f"{SECRET}:".encode()).decode()}
    path, headers = (("/v1/t", {"Origin": "https://shop.example"}) if browser
                     else ("/v1/track", basic))
    kind = "text/plain" if browser else "application/json"

    def make(i: int) -> tuple[bytes, int]:
        body: dict[str, object] = {"userId": f"user-{i % 5000}", "event": "bench.segment",
                                   "messageId": f"{run_id}-{path}-{i}",
                                   "properties": {"amount": i % 100, "plan": "pro"}}
        if browser:
            body["writeKey"] = SECRET
        request = _request("POST", path, json.dumps(body).encode(), headers)
        return request.replace(b"Content-Type: application/json", f"Content-Type: {kind}"
                               .encode(), 1), 1

    return make


def browser_vs_server(port: int, pid: int, run_id: str, seconds: float,
                      connections: int) -> tuple[Load, Load]:
    """``/v1/track`` and ``/v1/t`` in alternating phases (two each, ``seconds`` in all per
    route), so drift in the machine's load hits both alike."""
    server, browser = Load(), Load()
    for _ in range(BROWSER_ROUNDS):
        for total, as_browser in ((server, False), (browser, True)):
            load, _s = run_load(port, segment_single(run_id, browser=as_browser),
                                seconds / BROWSER_ROUNDS, connections, pid)
            total.ok, total.failed = total.ok + load.ok, total.failed + load.failed
            total.server_cpu = (total.server_cpu or 0.0) + (load.server_cpu or 0.0)
    return server, browser


def batch_events(run_id: str) -> Callable[[int], tuple[bytes, int]]:
    import base64

    auth = {"Authorization": "Basic " + base64.b64encode(f"{SECRET}:".encode()).decode()}

    def make(i: int) -> tuple[bytes, int]:
        items = [{"type": "track", "userId": f"user-{(i * BATCH_SIZE + j) % 5000}",
                  "event": "bench.batch", "messageId": f"{run_id}-{i}-{j}",
                  "properties": {"amount": j, "plan": "pro"}} for j in range(BATCH_SIZE)]
        return _request("POST", "/v1/batch", json.dumps({"batch": items}).encode(), auth), \
            BATCH_SIZE

    return make


# -- servers -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited at start:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=1)
            return
        time.sleep(0.1)
    raise SystemExit(f"server did not start:\n{log.read_text()[-2000:]}")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (all its threads); None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server(args: list[str], port: int, probe: str, workdir: Path,
           name: str) -> Iterator[int]:
    """Run a server process until the block ends; yields its pid."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                env={k: v for k, v in os.environ.items()
                                     if not k.startswith("SEGFLOW_")})
        try:
            _wait_http(f"http://127.0.0.1:{port}{probe}", proc, log)
            yield proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def segflowd(store_url: str, port: int, workdir: Path, ingest_only: bool, *,
             no_store: bool = False) -> contextlib.AbstractContextManager[int]:
    (workdir / "app.py").write_text("from segflowd import Segflow\n\napp = Segflow()\n")
    config = workdir / "segflow.toml"
    config.write_text(f"""
[daemon]
app = "app.py:app"
control_socket = "run/segflow.sock"
log_format = "json"
log_level = "warning"
[store]
url = "{store_url}"
[http]
listen = "127.0.0.1:{port}"
[[http.keys]]
name = "bench"
secret = "{SECRET}"
[email]
provider = "outbox"
[providers.outbox]
plugin = "outbox"
path = "outbox"
""")
    here = str(Path(__file__).resolve())
    command = ([sys.executable, here, "--serve-no-store", str(config)] if no_store
               else [sys.executable, here, "--serve-ingest-only", str(config)] if ingest_only
               else [sys.executable, "-m", "segflowd.cli", "run", "--config", str(config)])
    return server(command, port, "/healthz", workdir, "segflowd")


# -- the store side ------------------------------------------------------------------


def _sync_url(store_url: str) -> sa.URL:
    url = sa.engine.make_url(store_url)
    return url.set(drivername="sqlite" if url.drivername.startswith("sqlite")
                   else "mysql+pymysql")


def raw_insert_rate(store_url: str, seconds: float) -> float:
    """Rows/s of plain multi-row INSERTs into events, RAW_CHUNK rows per transaction."""
    from segflowd.store import Store

    async def main() -> float:
        store = Store.open(store_url)
        await store.migrate()
        from segflowd import schema

        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        rows = 0
        started = time.perf_counter()
        i = 0
        while time.perf_counter() - started < seconds:
            chunk = [{"user_id": f"user-{(i + j) % 5000}", "anonymous_id": None,
                      "name": "bench.raw", "attributes": {"amount": j, "plan": "pro"},
                      "dedupe_key": f"raw-{i + j}", "created_at": now, "received_at": now}
                     for j in range(RAW_CHUNK)]
            async with store.begin() as conn:
                await conn.execute(sa.insert(schema.events), chunk)
            rows += RAW_CHUNK
            i += RAW_CHUNK
        elapsed = time.perf_counter() - started
        async with store.begin() as conn:
            await conn.execute(sa.delete(schema.events).where(schema.events.c.name == "bench.raw"))
        await store.close()
        return rows / elapsed

    return asyncio.run(main())


def stored(store_url: str, name: str) -> int:
    engine = sa.create_engine(_sync_url(store_url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT COUNT(*) FROM events WHERE name = :n"),
                                    {"n": name}).scalar_one())
    finally:
        engine.dispose()


@contextlib.contextmanager
def mariadb_database() -> Iterator[str]:
    name = f"segflow_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(sa.engine.make_url(MARIADB).set(drivername="mysql+pymysql"),
                             poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield sa.engine.make_url(MARIADB).set(database=name).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


# -- figures -------------------------------------------------------------------------


def emit(figure: str, value: float, unit: str, baseline: float | None,
         target: float | None, **extra: object) -> None:
    ratio = round(value / baseline, 3) if baseline else None
    print(json.dumps({"bench": "ingest", "figure": figure, "value": round(value, 2),
                      "unit": unit, "baseline": None if baseline is None else round(baseline, 2),
                      "ratio": ratio, "target": target, **extra}), flush=True)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def bench_store(kind: str, store_url: str, seconds: float, connections: int,
                baseline: Load, baseline_rps: float, ingest_only: bool) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"segflow-bench-{kind}-"))
    try:
        raw_rate = raw_insert_rate(store_url, seconds)
        port = _free_port()
        run_id = uuid.uuid4().hex[:8]
        with segflowd(store_url, port, workdir, ingest_only) as pid:
            single, single_s = run_load(port, single_event(run_id), seconds, connections,
                                        pid)
            batch, batch_s = run_load(port, batch_events(run_id), seconds,
                                      max(4, connections // 4), pid)
            server_path, browser_path = browser_vs_server(port, pid, run_id, seconds,
                                                          connections)
        tags = {"store": kind, "daemon": "ingest-only" if ingest_only else "full",
                "connections": connections, "seconds": seconds}
        emit("single_rps", single.ok / single_s, "req/s", baseline_rps, 0.6,
             failed=single.failed, client_busy=round(single.client_cpu / single_s, 2),
             server_busy=None if single.server_cpu is None
             else round(single.server_cpu / single_s, 2), **tags)
        cpu, base_cpu = single.cpu_us_per_request(), baseline.cpu_us_per_request()
        if cpu is not None:
            # The server's own cost, read from /proc: unlike requests/s it does not depend on
            # how much of the 2 cores the load generator (or anything else) leaves it.
            emit("single_server_cpu_us", cpu, "us/req", base_cpu, None, **tags)
        emit("single_p50", _pct(single.latencies, 0.5), "ms", _pct(baseline.latencies, 0.5),
             None, **tags)
        emit("single_p99", _pct(single.latencies, 0.99), "ms", _pct(baseline.latencies, 0.99),
             None, **tags)
        emit("batch_events_per_s", batch.acked_events / batch_s, "events/s", raw_rate, 0.5,
             batch_size=BATCH_SIZE, failed=batch.failed, **tags)
        if batch.server_cpu is not None and batch.acked_events:
            emit("batch_server_cpu_us", batch.server_cpu / batch.acked_events * 1e6,
                 "us/event", None, None, batch_size=BATCH_SIZE, **tags)
        emit("batch_p50", _pct(batch.latencies, 0.5), "ms", None, None, **tags)
        emit("batch_p99", _pct(batch.latencies, 0.99), "ms", None, None, **tags)
        on_server, on_browser = (server_path.cpu_us_per_request(),
                                 browser_path.cpu_us_per_request())
        if on_server is not None and on_browser is not None:
            emit("browser_server_cpu_us", on_browser, "us/req", on_server, 1.05,
                 route="/v1/t", baseline_route="/v1/track", requests=browser_path.ok,
                 baseline_requests=server_path.ok,
                 failed=browser_path.failed + server_path.failed, **tags)
        acked = single.acked_events + batch.acked_events
        kept = stored(store_url, "bench.single") + stored(store_url, "bench.batch")
        emit("acked_events_stored", kept, "events", acked, 1.0, **tags)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def no_store_floor(seconds: float, connections: int, baseline: Load,
                   baseline_rps: float) -> None:
    """Single events through segflowd with a committer that never touches the store."""
    workdir = Path(tempfile.mkdtemp(prefix="segflow-bench-nostore-"))
    try:
        port = _free_port()
        with segflowd(f"sqlite+aiosqlite:///{workdir}/unused.db", port, workdir, True,
                      no_store=True) as pid:
            load, load_s = run_load(port, single_event("nostore"), seconds, connections, pid)
        tags = {"store": "none", "daemon": "ingest-only, no store", "connections": connections,
                "seconds": seconds}
        emit("single_rps_no_store", load.ok / load_s, "req/s", baseline_rps, None,
             failed=load.failed, client_busy=round(load.client_cpu / load_s, 2), **tags)
        cpu, base_cpu = load.cpu_us_per_request(), baseline.cpu_us_per_request()
        if cpu is not None:
            emit("single_server_cpu_us_no_store", cpu, "us/req", base_cpu, None, **tags)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="3 s phases, 32 connections")
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--connections", type=int, default=None)
    p.add_argument("--stores", default="sqlite,mariadb")
    p.add_argument("--ingest-only", action="store_true",
                   help="run segflowd with the ingest service alone (no engines consuming)")
    p.add_argument("--serve-baseline", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve-ingest-only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve-no-store", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    import structlog

    # stdout carries only the figures; the store's own log lines go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if args.serve_baseline is not None:
        serve_baseline(args.serve_baseline)
        return
    if args.serve_ingest_only is not None:
        serve_ingest_only(args.serve_ingest_only)
        return
    if args.serve_no_store is not None:
        serve_ingest_only(args.serve_no_store, no_store=True)
        return
    seconds = args.seconds or (3.0 if args.quick else 15.0)
    connections = args.connections or (32 if args.quick else 64)
    workdir = Path(tempfile.mkdtemp(prefix="segflow-bench-base-"))
    try:
        port = _free_port()
        with server([sys.executable, str(Path(__file__).resolve()), "--serve-baseline",
                     str(port)], port, "/", workdir, "baseline") as pid:
            base, base_s = run_load(port, single_event("base"), seconds, connections, pid)
        baseline_rps = base.ok / base_s
        busy = None if base.server_cpu is None else round(base.server_cpu / base_s, 2)
        # server_busy well under 1.0 with client_busy near 1.0: the load generator, not the
        # bare app, set the pace (the baseline is then a floor, and the ratio flatters).
        emit("baseline_bare_asgi_rps", baseline_rps, "req/s", None, None,
             connections=connections, seconds=seconds, server_busy=busy,
             client_busy=round(base.client_cpu / base_s, 2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.ingest_only:
        no_store_floor(seconds, connections, base, baseline_rps)
    for kind in args.stores.split(","):
        kind = kind.strip()
        if kind == "sqlite":
            with tempfile.TemporaryDirectory(prefix="segflow-bench-db-") as d:
                bench_store(kind, f"sqlite+aiosqlite:///{d}/bench.db", seconds, connections,
                            base, baseline_rps, args.ingest_only)
        elif kind == "mariadb":
            with mariadb_database() as url:
                bench_store(kind, url, seconds, connections, base, baseline_rps,
                            args.ingest_only)
        else:
            raise SystemExit(f"unknown store {kind!r} (sqlite, mariadb)")


if __name__ == "__main__":
    main()
