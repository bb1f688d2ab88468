"""sd_notify: datagrams to $NOTIFY_SOCKET, the watchdog interval, a no-op without systemd."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from segflowd.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.notify("READY=1") is False
    assert n.watchdog_interval is None


def test_ready_status_and_stopping_are_datagrams(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready("ready on 127.0.0.1:1")
    assert sock.recv(1024) == b"READY=1\nSTATUS=ready on 127.0.0.1:1"
    n.stopping()
    assert sock.recv(1024) == b"STOPPING=1"
    n.extend_timeout(12.5)
    assert sock.recv(1024) == b"EXTEND_TIMEOUT_USEC=12500000"


def test_abstract_socket_address_is_translated() -> None:
    n = Notifier({"NOTIFY_SOCKET": "@/org/systemd/notify"})
    assert n.address == "\0/org/systemd/notify"


def test_a_missing_socket_does_not_raise(tmp_path: Path) -> None:
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).notify("READY=1") is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval == 15.0


def test_watchdog_for_another_pid_is_ignored() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    assert Notifier(env).watchdog_interval is None
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier(env).watchdog_interval == 15.0


@pytest.mark.anyio
async def test_watchdog_loop_pings_repeatedly(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    async with anyio.create_task_group() as tg:
        tg.start_soon(n.watchdog_loop)
        got = [await anyio.to_thread.run_sync(sock.recv, 64) for _ in range(3)]
        tg.cancel_scope.cancel()
    assert got == [b"WATCHDOG=1"] * 3
