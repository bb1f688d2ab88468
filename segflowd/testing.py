"""Fakes for unit tests, shipped in the package (like ``httpx.MockTransport``), and the
public :class:`Simulation` a team tests its campaigns with (:mod:`segflowd.simulation`).

Integration tests use the real components; these stand in for the I/O edges only.
:class:`PrivateMariaDB` is the exception: a real server of a test's (or benchmark's) own.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.lowlevel
import sqlalchemy as sa

from .simulation import SentMessage, Simulation, TimelineEntry

__all__ = ["FakeClock", "PrivateMariaDB", "SentMessage", "Simulation", "TimelineEntry"]

EPOCH = dt.datetime(2026, 1, 1, 12, 0, 0)  # a fixed, naive-UTC start for reproducible tests


class FakeClock:
    """A clock that moves only when told: ``await clock.advance(days=30)`` runs in ms.

    Sleepers wake in deadline order as :meth:`advance` passes their deadlines; each wake
    yields to the event loop so the woken task can run before time moves on.
    """

    def __init__(self, start: dt.datetime = EPOCH) -> None:
        self._now = start
        self._mono = 0.0
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._ids = itertools.count()

    def now(self) -> dt.datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        entry = (self._mono + seconds, next(self._ids), event)
        bisect.insort(self._sleepers, entry)
        try:
            await event.wait()
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    def set(self, now: dt.datetime) -> None:
        """Jump wall time without waking anyone (e.g. to seed data 'in the past')."""
        self._now = now

    async def advance(self, seconds: float = 0.0, *, days: float = 0, hours: float = 0,
                      minutes: float = 0, settle: int = 5) -> None:
        """Move time forward, waking every sleeper whose deadline passes, in order."""
        total = seconds + days * 86400 + hours * 3600 + minutes * 60
        target = self._mono + total
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, event = self._sleepers.pop(0)
            self._now += dt.timedelta(seconds=max(0.0, deadline - self._mono))
            self._mono = max(self._mono, deadline)
            event.set()
            for _ in range(settle):
                await anyio.lowlevel.checkpoint()
        self._now += dt.timedelta(seconds=target - self._mono)
        self._mono = target
        for _ in range(settle):
            await anyio.lowlevel.checkpoint()


# -- a private MariaDB server --------------------------------------------------------------

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "mariadb-install-db"
MARIADB_START_TIMEOUT = 30.0  # seconds for a private mariadbd to accept connections
MARIADB_STOP_TIMEOUT = 30.0  # seconds for a private mariadbd to exit after SIGTERM
# Small and quick by default: no binary log, a small buffer pool and redo log, no DNS.
MARIADB_OPTIONS = ("--skip-log-bin", "--innodb-buffer-pool-size=64M",
                   "--innodb-log-file-size=16M", "--skip-name-resolve")


class PrivateMariaDB:
    """A mariadbd of its own (datadir under ``folder``, a free port): never the shared one.

    For tests that stop the store on purpose and for benchmarks that need a server sized
    for their data. :meth:`install` makes the datadir; :meth:`start` returns once the
    server answers over TCP with an empty database ``test``; :meth:`stop` at will.
    ``options`` replace :data:`MARIADB_OPTIONS` (e.g. a bigger buffer pool). Failures
    raise :class:`RuntimeError` with the end of the server's log.
    """

    def __init__(self, folder: Path, options: Sequence[str] = MARIADB_OPTIONS) -> None:
        programs = _mariadb_programs()
        if programs is None:
            raise RuntimeError(
                "mariadbd and mariadb-install-db are needed for a private MariaDB server")
        mariadbd, install_db = programs
        self.folder = folder
        self.datadir = folder / "data"
        self.options = tuple(options)
        self.mariadbd = mariadbd
        self.install_db = install_db
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.process: subprocess.Popen[bytes] | None = None
        self.server_url = f"mysql+aiomysql://root@127.0.0.1:{self.port}"
        self.url = f"{self.server_url}/test"

    @staticmethod
    def available() -> bool:
        """Whether this machine has the programs :class:`PrivateMariaDB` runs."""
        return _mariadb_programs() is not None

    def install(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "install.log").open("wb") as log:
            done = subprocess.run(
                [self.install_db, "--no-defaults", f"--datadir={self.datadir}",
                 f"--user={_user()}", "--auth-root-authentication-method=normal",
                 "--skip-test-db", *self.options],
                stdout=log, stderr=subprocess.STDOUT, timeout=MARIADB_START_TIMEOUT,
                check=False)
        if done.returncode != 0:
            raise RuntimeError("mariadb-install-db failed:\n"
                               + (self.folder / "install.log").read_text(errors="replace")[-3000:])

    def start(self) -> None:
        """Start mariadbd and return once it answers ``SELECT 1`` over TCP."""
        assert self.process is None or self.process.poll() is not None
        with (self.folder / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [self.mariadbd, "--no-defaults", f"--datadir={self.datadir}",
                 f"--port={self.port}", "--bind-address=127.0.0.1",
                 f"--socket={self.folder / 'mysqld.sock'}",
                 f"--pid-file={self.folder / 'mysqld.pid'}", f"--user={_user()}",
                 *self.options], stdout=log, stderr=subprocess.STDOUT)
        admin = sa.create_engine(f"mysql+pymysql://root@127.0.0.1:{self.port}",
                                 poolclass=sa.pool.NullPool,
                                 connect_args={"connect_timeout": 1})
        deadline = time.monotonic() + MARIADB_START_TIMEOUT
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"mariadbd exited with {self.process.returncode}:\n{self.log()}")
                try:
                    with admin.connect() as conn:
                        conn.exec_driver_sql(
                            "CREATE DATABASE IF NOT EXISTS test CHARACTER SET utf8mb4")
                        conn.commit()
                    return
                except sa.exc.OperationalError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"mariadbd not ready within "
                                           f"{MARIADB_START_TIMEOUT} s:\n{self.log()}") from None
                    time.sleep(0.05)
        finally:
            admin.dispose()

    def stop(self) -> None:
        """SIGTERM, and wait for a clean shutdown (SIGKILL if it takes too long)."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(MARIADB_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _mariadb_programs() -> tuple[str, str] | None:
    """(mariadbd, mariadb-install-db) on this machine, or None if either is missing."""
    mariadbd = MARIADBD if os.access(MARIADBD, os.X_OK) else shutil.which("mariadbd")
    install_db = shutil.which(INSTALL_DB)
    return None if mariadbd is None or install_db is None else (mariadbd, install_db)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
