"""Simulation speed: the example app's campaigns for many users over many simulated days.

    .venv/bin/python bench/simulate.py            # 1,000 users, 40 days
    .venv/bin/python bench/simulate.py --quick    # 100 users, 40 days

Figures (one JSON line each; the baseline is measured in the same run):
  user_days_per_second   users x 40 days / wall seconds of ``sim.advance(days=40)``
                         (target >= 10,000); no baseline (real time is users / 86,400)
  advance_wall_seconds   wall time of those 40 days; baseline: daemon_wall_seconds
  simulate_wall_seconds  wall time of the whole simulation: the users and events
                         ingested one call at a time (each settled before the next), then
                         the 40 days; baseline: daemon_wall_seconds
  daemon_wall_seconds    the in-process daemon (every service, the HTTP API, the file
                         outbox, on SQLite) making the same sends: the example app with
                         its waits made zero, the same users and events over HTTP, until
                         as many messages are sent as the simulation sent

Both run the same scenario: every user signs up (onboarding; half have completed their
profile), half last logged in long ago (winback), a tenth of those spent over 1000
(excluded from winback), and a twentieth ask for a password reset.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import sqlalchemy as sa
import structlog

from segflowd.config import load_config
from segflowd.daemon import Daemon
from segflowd.loader import load_app
from segflowd.schema import messages
from segflowd.testing import Simulation

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "saas"
START = dt.datetime(2026, 3, 1, 9, 0)
LONG_AGO = dt.datetime(2026, 1, 1)
DAYS = 40
DAEMON_TIMEOUT = 600.0  # seconds the daemon may take to send everything
CONCURRENCY = 16  # HTTP requests the daemon's clients keep in flight


def emit(figure: str, value: float, unit: str, baseline: float | None,
         target: str | None = None) -> None:
    ratio = None if not baseline else round(value / baseline, 3)
    print(json.dumps({"bench": "simulate", "figure": figure, "store": "sqlite",
                      "value": round(value, 4), "unit": unit,
                      "baseline": None if baseline is None else round(baseline, 4),
                      "ratio": ratio, "target": target}), flush=True)


Events = list[tuple[str, dict[str, object]]]


def scenario(n: int) -> Iterator[tuple[str, dict[str, object], Events]]:
    """(user id, attributes, [(event name, attributes)]) for ``n`` users."""
    for i in range(n):
        uid = f"u{i:05d}"
        attributes: dict[str, object] = {"email": f"{uid}@example.com", "name": f"User {i}",
                                         "profile_completed": i % 2 == 0}
        evs: Events = []
        if i % 2 == 1:
            if i % 20 == 1:
                evs.append(("purchase", {"amount": 1500}))
            evs.append(("login", {}))  # at LONG_AGO: inactive from the start
        if i % 20 == 3:
            evs.append(("reset_password_requested", {"token": f"t{i}"}))
        yield uid, attributes, evs


def run_simulation(n: int) -> tuple[float, float, int]:
    """(seconds to ingest, seconds for the 40 days, messages sent)."""
    app = load_app(f"{EXAMPLE / 'flows.py'}:app")
    with Simulation(app, start=START) as sim:
        t0 = time.perf_counter()
        for uid, attributes, evs in scenario(n):
            sim.user(uid, **attributes)
            for name, data in evs:
                sim.event(uid, name, at=LONG_AGO if name != "reset_password_requested"
                          else None, **data)
        t1 = time.perf_counter()
        sim.advance(days=DAYS)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, len(sim.sent())


def zero_wait_app(folder: Path) -> Path:
    """The example app with every wait made zero (the daemon cannot wait 40 days)."""
    source = (EXAMPLE / "flows.py").read_text(encoding="utf-8")
    source = re.sub(r"rt\.wait\([^)]*\)", "rt.wait(seconds=0)", source)
    source = source.replace('Segflow(templates="templates")',
                            f"Segflow(templates={str(EXAMPLE / 'templates')!r})")
    path = folder / "flows.py"
    path.write_text(source, encoding="utf-8")
    return path


async def run_daemon(n: int, expected: int, folder: Path) -> float:
    """Seconds from the first request until the daemon has sent ``expected`` messages."""
    app_path = zero_wait_app(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cfg = folder / "segflow.toml"
    cfg.write_text(f"""
[daemon]
app = "{app_path}"
control_socket = "run/segflow.sock"
[store]
url = "sqlite+aiosqlite:///{folder / 'store.db'}"
[http]
listen = "127.0.0.1:{port}"
[[http.keys]]
name = "default"
secret = "bench"
[email]
from = "Bench <bench@example.com>"
provider = "outbox"
secret = "bench-links"
[providers.outbox]
plugin = "outbox"
path = "outbox"
""", encoding="utf-8")
    config = load_config(cfg, environ={})
    daemon = Daemon(config, load_app(str(app_path)))
    url = f"http://127.0.0.1:{port}"
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        while not daemon.statistics().ready:  # noqa: ASYNC110 - the daemon has no ready event
            await anyio.sleep(0.01)
        started = time.perf_counter()
        limiter = anyio.CapacityLimiter(CONCURRENCY)
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     headers={"Authorization": "Bearer bench"}) as client:
            async def one(uid: str, attributes: dict[str, object],
                          evs: list[tuple[str, dict[str, object]]]) -> None:
                async with limiter:
                    r = await client.put(f"/v1/users/{uid}", json={"attributes": attributes})
                    r.raise_for_status()
                    for name, data in evs:
                        body: dict[str, object] = {"name": name, "attributes": data}
                        if name != "reset_password_requested":
                            body["timestamp"] = LONG_AGO.isoformat() + "Z"
                        r = await client.post(f"/v1/users/{uid}/events", json=body)
                        r.raise_for_status()

            async with anyio.create_task_group() as clients:
                for uid, attributes, evs in scenario(n):
                    clients.start_soon(one, uid, attributes, evs)
        sent = 0
        with anyio.fail_after(DAEMON_TIMEOUT):
            while sent < expected:
                await anyio.sleep(0.05)
                async with daemon.store.connect() as conn:
                    sent = int((await conn.execute(sa.select(sa.func.count()).where(
                        messages.c.status == "sent"))).scalar() or 0)
        elapsed = time.perf_counter() - started
        daemon.request_stop()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true", help="100 users instead of 1,000")
    p.add_argument("--users", type=int, metavar="N", help="users (default 1000, quick 100)")
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40),
                        cache_logger_on_first_use=True)  # errors only: logs cost time
    n = args.users or (100 if args.quick else 1000)
    ingest_s, advance_s, sent = run_simulation(n)
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(KeyboardInterrupt):
        daemon_s = anyio.run(run_daemon, n, sent, Path(tmp))
    print(json.dumps({"bench": "simulate", "users": n, "days": DAYS, "messages": sent,
                      "ingest_seconds": round(ingest_s, 3),
                      "advance_seconds": round(advance_s, 3)}), flush=True)
    emit("user_days_per_second", n * DAYS / advance_s, "user-days/s", None, ">= 10000")
    emit("advance_wall_seconds", advance_s, "s", daemon_s)
    emit("simulate_wall_seconds", ingest_s + advance_s, "s", daemon_s)
    emit("daemon_wall_seconds", daemon_s, "s", None)


if __name__ == "__main__":
    main()
