"""One segflowd per store: a second daemon on the same store exits 2 naming the holder,
the first goes on, and once it has stopped a new one starts (SQLite and MariaDB)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from daemon_harness import StartDaemon, free_port, output, spawn, stop, write_config

pytestmark = pytest.mark.slow

EXIT_TIMEOUT = 30.0  # seconds a refused start may take to exit (interpreter start included)


def mariadb_lock_holder(store_url: str) -> int:
    """The connection id holding the daemon lock of the store's database."""
    url = sa.engine.make_url(store_url)
    engine = sa.create_engine(url.set(drivername="mysql+pymysql"), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            holder = conn.execute(sa.text("SELECT IS_USED_LOCK(:name)"),
                                  {"name": f"segflowd:{url.database}"}).scalar()
    finally:
        engine.dispose()
    assert holder is not None, "nobody holds the daemon lock"
    return int(holder)


def test_a_second_daemon_on_the_same_store_exits_2_naming_the_holder(
        start_daemon: StartDaemon, store_url: str, tmp_path: Path) -> None:
    first = start_daemon(store_url=store_url)
    port = free_port()
    second = spawn(write_config(tmp_path / "second", store_url=store_url),
                   env={"SEGFLOW_HTTP_LISTEN": f"127.0.0.1:{port}",
                        "SEGFLOW_HTTP_PUBLIC_URL": f"http://127.0.0.1:{port}"})
    try:
        second.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(second)
        pytest.fail("a second segflowd ran beside the first on the same store")
    out, err = output(second)
    assert second.returncode == 2, err
    assert "another segflowd is running on this store" in err
    if store_url.startswith("sqlite"):
        assert f"pid {first.process.pid} on host {socket.gethostname()}" in err
    else:
        assert f"connection {mariadb_lock_holder(store_url)} from " in err
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1, err

    assert first.process.poll() is None  # the first one is untouched
    assert httpx.get(f"{first.base_url}/healthz").status_code == 200
    status, _, first_err = first.stop()
    assert status == 0, first_err
    third = start_daemon(store_url=store_url)  # the lock went with the first daemon
    assert httpx.get(f"{third.base_url}/healthz").status_code == 200
    status, _, third_err = third.stop()
    assert status == 0, third_err
