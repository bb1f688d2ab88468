"""systemd's sd_notify protocol: datagrams to ``$NOTIFY_SOCKET``; a no-op without it."""

from __future__ import annotations

import os
import socket

import anyio

__all__ = ["Notifier"]


class Notifier:
    """Sends READY=1, STOPPING=1, WATCHDOG=1, STATUS= and EXTEND_TIMEOUT_USEC= under systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_for_us = not pid or pid == str(os.getpid())
        self.watchdog_interval: float | None = (
            int(usec) / 1e6 / 2 if usec.isdigit() and int(usec) > 0 and watchdog_for_us else None
        )

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> bool:
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(lines).encode(), self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask systemd for ``seconds`` more before it gives up on start (or stop)."""
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    async def watchdog_loop(self) -> None:
        """Ping the watchdog every WATCHDOG_USEC/2 for as long as the task lives."""
        if self.watchdog_interval is None or not self.address:
            return
        while True:
            self.notify("WATCHDOG=1")
            await anyio.sleep(self.watchdog_interval)
