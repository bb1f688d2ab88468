"""segflowd as a process: ready, health, metrics, signals, sd_notify, bad starts."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from daemon_harness import (
    EMPTY_APP,
    StartDaemon,
    free_port,
    output,
    spawn,
    stop,
    wait_healthy,
    write_config,
)

pytestmark = pytest.mark.slow

EXIT_TIMEOUT = 30.0  # seconds a failing start may take to exit (interpreter start included)


def _wait_for_log(process: object, event: str, timeout: float = 20.0) -> dict[str, object]:
    """The first JSON log line on stdout whose event is ``event``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out, _ = output(process)  # type: ignore[arg-type]
        for line in out.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == event:
                    return dict(record)
        time.sleep(0.05)
    out, err = output(process)  # type: ignore[arg-type]
    pytest.fail(f"no {event!r} log line within {timeout} s:\n{out}\n{err}")


def test_healthz_metrics_and_sigterm_exit_0(start_daemon: StartDaemon, sqlite_url: str) -> None:
    d = start_daemon(store_url=sqlite_url)
    health = httpx.get(f"{d.base_url}/healthz")
    assert health.status_code == 200
    assert health.headers["content-type"].startswith("application/json")
    body = health.json()
    assert body["status"] == "ok"
    assert body["store"] == "ok"

    metrics = httpx.get(f"{d.base_url}/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE segflow_up gauge" in metrics.text
    assert "\nsegflow_up 1" in metrics.text
    assert 'segflow_store_up{dialect="sqlite"} 1' in metrics.text

    t0 = time.monotonic()
    status, out, err = d.stop(signal.SIGTERM)
    assert status == 0, err
    assert time.monotonic() - t0 < 10.0
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert "daemon.ready" in events
    assert events.index("daemon.stopping") < events.index("daemon.stopped")
    assert "Traceback" not in err + out


def test_sigint_also_stops_with_exit_0(start_daemon: StartDaemon, sqlite_url: str) -> None:
    d = start_daemon(store_url=sqlite_url)
    base_url, process, config_path = d
    assert config_path.read_text().count("[daemon]") == 1
    assert process.poll() is None
    assert httpx.get(f"{base_url}/healthz").json()["status"] == "ok"
    status, out, err = d.stop(signal.SIGINT)
    assert status == 0, err
    assert "daemon.stopped" in out
    assert "Traceback" not in err + out


@pytest.mark.mariadb
def test_runs_on_mariadb_and_stops_with_exit_0(start_daemon: StartDaemon,
                                                mariadb_url: str) -> None:
    d = start_daemon(store_url=mariadb_url)
    metrics = httpx.get(f"{d.base_url}/metrics").text
    assert 'segflow_store_up{dialect="mysql"} 1' in metrics or \
        'segflow_store_up{dialect="mariadb"} 1' in metrics
    status, _, err = d.stop()
    assert status == 0, err


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path: Path,
                                                            sqlite_url: str) -> None:
    config = write_config(tmp_path, store_url=sqlite_url)
    config.write_text(config.read_text().replace("drain_timeout = 5.0", "drain_timeout = 'x'"))
    p = spawn(config)
    p.wait(timeout=EXIT_TIMEOUT)
    out, err = output(p)
    assert p.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(config) in lines[0]
    assert "daemon.drain_timeout" in lines[0]
    assert "Traceback" not in err + out


def test_app_syntax_error_exits_2_naming_file_and_line(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(tmp_path, store_url=sqlite_url, app="from segflowd import Segflow\n"
                          "app = Segflow(\n\ndef broken(:\n")
    p = spawn(config)
    p.wait(timeout=EXIT_TIMEOUT)
    _, err = output(p)
    assert p.returncode == 2
    assert f"{tmp_path / 'app.py'}:" in err
    assert "syntax error" in err
    assert "Traceback" not in err


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    p = spawn(tmp_path / "nowhere.toml")
    p.wait(timeout=EXIT_TIMEOUT)
    _, err = output(p)
    assert p.returncode == 2
    assert "nowhere.toml" in err
    assert "not found" in err
    assert "Traceback" not in err


def test_schema_newer_than_known_is_refused_without_traceback(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE segflow_schema (id INTEGER PRIMARY KEY, version INTEGER, "
                     "migrated_at TIMESTAMP, migrated_by VARCHAR(64))")
        conn.execute("INSERT INTO segflow_schema VALUES (1, 999, '2026-01-01', 'future')")
    config = write_config(tmp_path / "d", store_url=f"sqlite+aiosqlite:///{db}")
    p = spawn(config, env={"SEGFLOW_HTTP_LISTEN": f"127.0.0.1:{free_port()}"})
    p.wait(timeout=EXIT_TIMEOUT)
    out, err = output(p)
    assert p.returncode == 1
    assert "newer than this segflowd knows" in err
    assert "999" in err
    assert "Traceback" not in err + out


def test_unreachable_store_is_retried_with_a_log_line_then_stops_on_sigterm(
        tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    config = write_config(tmp_path, store_url=f"mysql+aiomysql://u:pw@127.0.0.1:{closed}/x",
                          extra="")
    config.write_text(config.read_text().replace("start_retry_max = 1.0",
                                                 "start_retry_max = 0.5\nconnect_timeout = 1.0"))
    p = spawn(config, env={"SEGFLOW_HTTP_LISTEN": f"127.0.0.1:{free_port()}"})
    first = _wait_for_log(p, "store.unreachable")
    assert first["attempt"] == 1
    assert "pw" not in str(first["store"])  # the password is masked
    assert p.poll() is None  # still running: retrying, not crashed
    time.sleep(1.2)  # at least one more attempt at the capped backoff
    status, out, err = stop(p)
    assert status == 0, err
    attempts = [json.loads(line)["attempt"] for line in out.splitlines()
                if line.startswith("{") and '"store.unreachable"' in line]
    assert len(attempts) >= 2
    assert "Traceback" not in out + err


def test_sd_notify_ready_watchdog_and_stopping(tmp_path: Path, sqlite_url: str) -> None:
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(20.0)
    port = free_port()
    config = write_config(tmp_path / "d", store_url=sqlite_url, app=EMPTY_APP)
    p = spawn(config, env={"SEGFLOW_HTTP_LISTEN": f"127.0.0.1:{port}",
                           "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    try:
        seen: list[str] = []

        def receive_until(wanted: str) -> None:
            while not any(m.split("\n")[0] == wanted or wanted in m.split("\n") for m in seen):
                seen.append(listener.recv(4096).decode())

        receive_until("READY=1")
        wait_healthy(f"http://127.0.0.1:{port}", p)
        before = sum("WATCHDOG=1" in m for m in seen)
        while sum("WATCHDOG=1" in m for m in seen) < before + 2:
            seen.append(listener.recv(4096).decode())
        p.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        status, _, err = stop(p)
    finally:
        listener.close()
        if p.poll() is None:
            p.kill()
    assert status == 0, err
    ready = next(m for m in seen if "READY=1" in m.split("\n"))
    assert f"STATUS=ready on 127.0.0.1:{port}" in ready
    kinds = [line for m in seen for line in m.split("\n") if "=" in line and
             not line.startswith("STATUS=")]
    assert kinds.index("READY=1") < kinds.index("STOPPING=1")
