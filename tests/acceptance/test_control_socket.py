"""The control socket of segflowd running as a process: the CLI over it, and the socket's
safety between processes (a live socket is not hijacked, a killed daemon's is replaced)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from daemon_harness import StartDaemon, free_port, output, spawn, stop, wait_healthy

APP = """
import sqlalchemy as sa
from segflowd import Segflow
from segflowd.schema import users

app = Segflow()


@app.segment("everyone")
def everyone():
    return sa.select(users.c.id)
"""
EXIT_TIMEOUT = 30.0  # seconds


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "segflowd.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=EXIT_TIMEOUT, check=False)


def test_status_and_admin_subcommands_talk_to_the_running_daemon(
        start_daemon: StartDaemon, sqlite_url: str) -> None:
    d = start_daemon(store_url=sqlite_url, app=APP)
    status = cli(d.config_path, "status")
    refresh = cli(d.config_path, "refresh", "everyone")
    unknown = cli(d.config_path, "pause", "no-such-campaign")
    assert status.returncode == 0, status.stderr
    assert "store:  sqlite, healthy" in status.stdout
    assert (d.config_path.parent / "run" / "segflow.sock").is_socket()
    assert refresh.returncode == 0, refresh.stderr
    assert refresh.stdout.startswith("segment.refresh: ok")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("segflowd: campaign.pause: ")
    assert unknown.stderr.count("\n") == 1
    assert "no-such-campaign" in unknown.stderr


def test_a_live_socket_is_never_hijacked_and_a_killed_daemons_is_replaced(
        start_daemon: StartDaemon, sqlite_url: str) -> None:
    first = start_daemon(store_url=sqlite_url)
    config = first.config_path
    sock = config.parent / "run" / "segflow.sock"
    # Another store: on the same one the store's daemon lock would refuse it first.
    other_store = f"sqlite+aiosqlite:///{config.parent}/other.db"
    second = spawn(config, env={"SEGFLOW_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
                                "SEGFLOW_STORE_URL": other_store})
    second.wait(timeout=EXIT_TIMEOUT)
    out, err = output(second)
    assert second.returncode == 1
    assert "another segflowd is already listening on the control socket" in err
    assert "Traceback" not in out + err
    assert cli(config, "status").returncode == 0  # the first daemon still answers

    first.stop(signal.SIGKILL)  # no clean-up: the socket file stays behind, stale
    assert sock.is_socket()
    port = free_port()
    third = spawn(config, env={"SEGFLOW_HTTP_LISTEN": f"127.0.0.1:{port}"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", third)
        status = cli(config, "status")
        assert status.returncode == 0, status.stderr
        assert "control_socket" not in status.stderr
    finally:
        code, _, _ = stop(third)
    assert code == 0
    assert not sock.exists()  # removed by a clean shutdown
