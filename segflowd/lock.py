"""The daemon lock: one segflowd per store, held for the daemon's life.

Two daemons on one store would each do all the work (every flow step, every send), so
the second one refuses to start. This holds until a scale-out feature shares a store
between daemons through leases; until then there are no cluster settings to opt out.

* **MariaDB/MySQL**: ``GET_LOCK(name, 0)`` on a connection of its own (outside the
  store's pool) kept open for the daemon's life. User-level locks are server-wide, so
  ``name`` is ``segflowd:<database>`` (hashed when longer than the 64 characters MySQL
  allows): two databases on one server do not collide. The server frees the lock with the
  connection, so a daemon killed with SIGKILL leaves nothing behind; the connection's
  ``wait_timeout`` is ``IDLE_TIMEOUT`` so a holder whose host vanished lets go in about
  a minute. The holder is named by its connection id and client address.
* **SQLite**: ``flock`` on ``<database file>.lock`` beside the database, whose text is
  the holder's host and pid. The kernel frees it with the process. An in-memory database
  is private to its process and needs no lock.

A daemon that finds the lock taken raises :class:`~segflowd.errors.StoreLocked` naming the
holder (``segflowd run`` exits 2: a person has to stop one of them; systemd does not
restart on it).

Losing the lock: the MySQL connection can drop (a server restart, the network, ``KILL``)
and the lock goes with it. :meth:`DaemonLock.watch` checks every ``WATCH_INTERVAL``
seconds; on a loss it reconnects with backoff and takes the lock again. If another
daemon took it meanwhile it raises StoreLocked, and the daemon drains and stops rather
than run beside it. While the server cannot be reached it keeps trying (nobody else can
take the lock there either, and the daemon's own store work is failing meanwhile). A lock
is not a fence: for up to ``WATCH_INTERVAL`` seconds after a loss, writes already under
way may overlap with another daemon's; the store's unique keys keep those from doubling.

``segflowd migrate`` and ``segflowd check`` do not take the lock: ``check`` only reads,
and ``migrate`` is serialised by its own migration lock; the daemon takes this lock
before it migrates, so a second daemon never migrates the schema under a running one.
Migrating beside a running daemon is the upgrade procedure (migrate, then restart).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

import anyio
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .errors import StoreError, StoreLocked
from .store import Store, is_unavailable

__all__ = ["DaemonLock", "LockStatistics", "lock_name"]

log = structlog.get_logger("segflowd.lock")

WATCH_INTERVAL = 2.0  # seconds between checks that the MySQL lock is still held
CHECK_TIMEOUT = 10.0  # seconds a check may take before the connection counts as lost
RETRY_FIRST = 0.5  # seconds before the second attempt to reach the server
RETRY_MAX = 5.0  # seconds between attempts to take a lost lock again, at most
IDLE_TIMEOUT = 60  # seconds: the server drops the lock connection after this long idle
RELEASE_TIMEOUT = 5.0  # seconds releasing the lock at shutdown may take
MAX_LOCK_NAME = 64  # characters: MySQL's limit for a GET_LOCK name
LOCK_PREFIX = "segflowd:"

# Named SQL for the MySQL lock (user-level locks have no SQLAlchemy Core spelling).
_TAKE = sa.text("SELECT GET_LOCK(:name, 0), CONNECTION_ID()")
_HOLDER = sa.text("SELECT IS_USED_LOCK(:name)")
_RELEASE = sa.text("SELECT RELEASE_LOCK(:name)")
_IDLE = sa.text("SET SESSION wait_timeout = :seconds")
_CLIENT = sa.text("SELECT HOST, USER FROM information_schema.PROCESSLIST WHERE ID = :id")


def lock_name(database: str) -> str:
    """The GET_LOCK name for a database: readable when it fits in 64 characters."""
    name = LOCK_PREFIX + database
    if len(name) <= MAX_LOCK_NAME:
        return name
    return LOCK_PREFIX + hashlib.sha256(database.encode()).hexdigest()[:40]


@dataclasses.dataclass(frozen=True)
class LockStatistics:
    kind: str  # "mysql" | "file" | "none"
    name: str  # the lock's name or file; "" for none
    held: bool
    reacquired: int  # times a lost MySQL lock was taken again


OnRetry = Callable[[int, float, str], None]


class DaemonLock:
    """The lock of one store; make it with :meth:`for_store`. See the module docstring.

    ``acquire`` then ``watch`` (a task for the daemon's life) then ``release``; release
    is safe to call when nothing is held.
    """

    kind = "none"
    name = ""

    @classmethod
    def for_store(cls, store: Store, *, connect_timeout: float = 5.0) -> DaemonLock:
        url = sa.engine.make_url(store.url)
        if store.dialect == "sqlite":
            database = url.database or ""
            if database in ("", ":memory:") or url.query.get("mode") == "memory":
                return cls()
            return _FileLock(Path(database), store.safe_url)
        return _ServerLock(store, lock_name(url.database or ""), connect_timeout)

    async def acquire(self, *, retry_max: float = RETRY_MAX,
                      on_retry: OnRetry | None = None) -> None:
        """Take the lock, waiting for an unreachable server; StoreLocked if it is held."""

    async def watch(self) -> None:
        """Keep the lock (a task for the daemon's life); StoreLocked once another has it."""

    async def release(self) -> None:
        """Let the lock go (at shutdown)."""

    def statistics(self) -> LockStatistics:
        return LockStatistics(kind=self.kind, name=self.name, held=False, reacquired=0)


class _FileLock(DaemonLock):
    kind = "file"

    def __init__(self, database: Path, safe_url: str) -> None:
        self.path = database.with_name(database.name + ".lock")
        self.name = str(self.path)
        self.safe_url = safe_url
        self._fd: int | None = None

    async def acquire(self, *, retry_max: float = RETRY_MAX,
                      on_retry: OnRetry | None = None) -> None:
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_file_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise StoreLocked(
                f"another segflowd is running on this store ({self.safe_url}): {holder} "
                f"holds its lock file {self.path}; stop that daemon first") from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {exc.strerror}") from None
        since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host={socket.gethostname()}\npid={os.getpid()}\nsince={since}\n"
                  .encode(), 0)
        self._fd = fd
        log.info("daemon.lock_taken", lock=self.name)

    async def watch(self) -> None:
        return None  # the kernel holds an flock for as long as the process lives

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # The file stays: removing it would let a starting daemon lock the old file
        # while another creates and locks a new one under the same name.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the only descriptor drops the flock

    def statistics(self) -> LockStatistics:
        return LockStatistics(kind=self.kind, name=self.name, held=self._fd is not None,
                              reacquired=0)


def _describe_file_holder(text: str) -> str:
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if "pid" not in fields:
        return "a process that has not yet written its name"
    out = f"pid {fields['pid']} on host {fields.get('host', '?')}"
    return out + (f" (since {fields['since']})" if "since" in fields else "")


class _ServerLock(DaemonLock):
    kind = "mysql"

    def __init__(self, store: Store, name: str, connect_timeout: float) -> None:
        self.name = name
        self.safe_url = store.safe_url
        self._engine: AsyncEngine = create_async_engine(
            store.engine.url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": int(max(1, connect_timeout))})
        # A frozen server (SIGSTOP: connections accepted, nothing answered) must not hang
        # the start or the watch: taking the lock is bounded as a whole, and a take that
        # ran out is retried like an unreachable server.
        self._take_timeout = connect_timeout + CHECK_TIMEOUT
        self._conn: AsyncConnection | None = None
        self._id: int | None = None  # our connection's id while it holds the lock
        self._previous: int | None = None  # the id of the connection that held it last
        self._reacquired = 0

    async def acquire(self, *, retry_max: float = RETRY_MAX,
                      on_retry: OnRetry | None = None) -> None:
        delay = min(RETRY_FIRST, retry_max)
        attempt = 0
        while True:
            attempt += 1
            try:
                held_by = await self._take()
            except Exception as exc:
                if not is_unavailable(exc):
                    raise StoreError(f"store {self.safe_url}: {_short(exc)}") from None
                if on_retry is not None:
                    on_retry(attempt, delay, _short(exc))
                await anyio.sleep(delay)
                delay = min(delay * 2, retry_max)
                continue
            if held_by is not None:
                raise self._locked(held_by, "")
            log.info("daemon.lock_taken", lock=self.name, connection=self._id)
            return

    async def watch(self) -> None:
        while True:
            await anyio.sleep(WATCH_INTERVAL)
            if not await self._still_held():
                await self._regain()

    async def release(self) -> None:
        conn, self._conn, self._id = self._conn, None, None
        with anyio.move_on_after(RELEASE_TIMEOUT, shield=True):
            if conn is not None:
                try:
                    await conn.execute(_RELEASE, {"name": self.name})
                except Exception as exc:  # closing the connection frees it all the same
                    log.debug("daemon.lock_release_failed", error=_short(exc))
                await _close(conn)
            await self._engine.dispose()

    def statistics(self) -> LockStatistics:
        return LockStatistics(kind=self.kind, name=self.name, held=self._id is not None,
                              reacquired=self._reacquired)

    # -- internals -------------------------------------------------------------------

    async def _take(self) -> tuple[str, int | None] | None:
        """Connect and GET_LOCK: None once it is ours, else who holds it (a description
        and the holder's connection id). TimeoutError when the server does not answer."""
        with anyio.fail_after(self._take_timeout):
            return await self._take_unbounded()

    async def _take_unbounded(self) -> tuple[str, int | None] | None:
        conn = await self._engine.connect()
        try:
            got, me = (await conn.execute(_TAKE, {"name": self.name})).one()
            if got != 1:
                held_by = await self._holder(conn)
                await _close(conn)
                return held_by
            await conn.execute(_IDLE, {"seconds": IDLE_TIMEOUT})
        except BaseException:
            await _close(conn)
            raise
        self._conn, self._id = conn, int(me)
        return None

    def _locked(self, held_by: tuple[str, int | None], lost: str) -> StoreLocked:
        holder, cid = held_by
        kill = f" (if it is gone, KILL {cid} on the server frees the lock)" if cid else ""
        return StoreLocked(
            f"{lost}another segflowd is running on this store ({self.safe_url}): "
            f"{holder} holds its lock {self.name!r}; stop that daemon first{kill}")

    async def _holder(self, conn: AsyncConnection) -> tuple[str, int | None]:
        """Who holds the lock: its connection and where it comes from, if the server says."""
        cid = (await conn.execute(_HOLDER, {"name": self.name})).scalar()
        if cid is None:
            return "a connection that has just let it go", None
        try:
            row = (await conn.execute(_CLIENT, {"id": int(cid)})).first()
        except Exception:  # no PROCESS privilege, or no such table: the id alone
            row = None
        where = f" from {row[0]} (user {row[1]})" if row is not None else ""
        return f"server connection {int(cid)}{where}", int(cid)

    async def _still_held(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            with anyio.fail_after(CHECK_TIMEOUT):
                holder = (await conn.execute(_HOLDER, {"name": self.name})).scalar()
        except Exception as exc:
            log.warning("daemon.lock_lost", lock=self.name, reason="connection lost",
                        error=_short(exc))
            await self._drop()
            return False
        if holder is not None and int(holder) == self._id:
            return True
        log.warning("daemon.lock_lost", lock=self.name, reason="no longer held",
                    holder=holder)
        await self._drop()
        return False

    async def _regain(self) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                held_by = await self._take()
            except Exception as exc:
                if not is_unavailable(exc):
                    raise StoreError(f"lost the store lock and cannot take it again: "
                                     f"store {self.safe_url}: {_short(exc)}") from None
                log.warning("daemon.lock_retry", lock=self.name, error=_short(exc),
                            retry_in_s=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if held_by is None:
                self._reacquired += 1
                log.warning("daemon.lock_reacquired", lock=self.name, connection=self._id)
                return
            if held_by[1] is not None and held_by[1] == self._previous:
                # Our old connection, which the server has not yet closed (a killed one
                # winding down; a network cut it has not seen, at most IDLE_TIMEOUT).
                log.warning("daemon.lock_retry", lock=self.name, retry_in_s=delay,
                            error=f"the server still holds it for our old connection "
                                  f"{held_by[1]}")
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            raise self._locked(held_by, "lost the store lock (its connection dropped) and ")

    async def _drop(self) -> None:
        if self._id is not None:
            self._previous = self._id
        conn, self._conn, self._id = self._conn, None, None
        if conn is not None:
            with anyio.move_on_after(RELEASE_TIMEOUT, shield=True):
                await _close(conn)


async def _close(conn: AsyncConnection) -> None:
    try:
        await conn.close()
    except Exception as exc:  # a dead connection: the server has freed the lock
        log.debug("daemon.lock_close_failed", error=_short(exc))
        with contextlib.suppress(Exception):
            await conn.invalidate()


def _short(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's statement dump and links."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return text.split("\n", 1)[0][:300] or type(exc).__name__
