"""Start-to-ready time of the segflowd process on SQLite and MariaDB, same-run baseline.

    .venv/bin/python bench/startup.py            # full: 10 starts per case
    .venv/bin/python bench/startup.py --quick    # 3 starts per case
    .venv/bin/python bench/startup.py --stores sqlite

"Ready" is the first ``GET /healthz`` answering 200, timed from just before the process
is spawned (``python -m segflowd.cli run``, the same command systemd runs). Per store:

* ``ready_s_empty_store``: the first start on an empty store (includes creating the schema).
* ``ready_s_warm_store``: later starts on the migrated store.

The baseline is the same interpreter running ``python -c pass``, measured in this run,
so ``ratio`` says how many bare interpreter starts one daemon start costs. Medians are
reported. Needs MariaDB at $SEGFLOW_TEST_MARIADB (default root@127.0.0.1:3306) for the
mariadb case.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa

MARIADB = os.environ.get("SEGFLOW_TEST_MARIADB", "mysql+aiomysql://root@127.0.0.1:3306")
TARGET_READY = 3.0  # seconds: a daemon start should feel instant to an operator
POLL = 0.005  # seconds between /healthz attempts
TIMEOUT = 60.0  # seconds before a start counts as failed

APP = "from segflowd import Segflow\n\napp = Segflow()\n"
CONFIG = """
[daemon]
app = "app.py:app"
control_socket = "run/segflow.sock"
log_format = "json"
log_level = "warning"
[store]
url = "{url}"
[http]
listen = "127.0.0.1:{port}"
[providers.outbox]
plugin = "outbox"
path = "var/outbox"
"""


def emit(figure: str, value: float, unit: str, baseline: float | None, target: str) -> None:
    print(json.dumps({
        "bench": "startup", "figure": figure, "value": round(value, 4), "unit": unit,
        "baseline": None if baseline is None else round(baseline, 4),
        "ratio": round(value / baseline, 2) if baseline else None, "target": target,
    }), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def interpreter_start() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


def daemon_start(folder: Path, url: str) -> float:
    port = free_port()
    (folder / "segflow.toml").write_text(CONFIG.format(url=url, port=port))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGFLOW_", "NOTIFY_"))}
    with (folder / "daemon.log").open("a") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "segflowd.cli", "run", "--config",
                              str(folder / "segflow.toml")], cwd=folder, env=env,
                             stdout=log, stderr=log)
        try:
            with httpx.Client(timeout=1.0) as client:
                while True:
                    if p.poll() is not None:
                        raise SystemExit(f"segflowd exited early; see {folder / 'daemon.log'}")
                    if time.perf_counter() - t0 > TIMEOUT:
                        raise SystemExit(f"segflowd not ready in {TIMEOUT} s")
                    try:
                        if client.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(POLL)
            elapsed = time.perf_counter() - t0
        finally:
            p.send_signal(signal.SIGTERM)
            if p.wait(timeout=30) != 0:
                raise SystemExit(f"segflowd exited with {p.returncode} on SIGTERM")
    return elapsed


def mariadb_database() -> tuple[str, sa.engine.Engine, str]:
    admin = sa.create_engine(sa.engine.make_url(MARIADB).set(
        drivername="mysql+pymysql", database=None), poolclass=sa.pool.NullPool)
    name = f"segflow_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    url = sa.engine.make_url(MARIADB).set(database=name).render_as_string(hide_password=False)
    return url, admin, name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 starts per case instead of 10")
    p.add_argument("--stores", default="sqlite,mariadb", help="comma-separated")
    args = p.parse_args()
    runs = 3 if args.quick else 10
    interpreter_start()  # warm the OS file cache for both sides alike
    baseline = statistics.median(interpreter_start() for _ in range(runs))
    emit("python_c_pass_s", baseline, "s", None, "baseline")
    target = f"<= {TARGET_READY} s"
    for store in args.stores.split(","):
        with tempfile.TemporaryDirectory(prefix="segflow-bench-") as tmp:
            folder = Path(tmp)
            (folder / "app.py").write_text(APP)
            admin = None
            if store == "sqlite":
                url = "sqlite+aiosqlite:///var/segflow.db"
            else:
                url, admin, name = mariadb_database()
            try:
                cold = daemon_start(folder, url)
                warm = statistics.median(daemon_start(folder, url) for _ in range(runs))
            finally:
                if admin is not None:
                    with admin.connect() as conn:
                        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
                    admin.dispose()
        emit(f"{store}_ready_s_empty_store", cold, "s", baseline, target)
        emit(f"{store}_ready_s_warm_store", warm, "s", baseline, target)


if __name__ == "__main__":
    main()
