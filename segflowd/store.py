"""The store: one SQLAlchemy async engine over MariaDB/MySQL or SQLite.

Every dialect difference lives here (connection setup, upsert/insert-ignore spelling,
error classification), so the rest of the daemon writes portable Core.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import json
import os
import pkgutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from . import migrations, schema
from .clock import utcnow
from .errors import SchemaTooNew, StoreError, StoreUnavailable
from .storebounds import bounded_connect, read_bound

__all__ = ["Store", "StoreStatistics", "is_unavailable", "json_text"]

log = structlog.get_logger("segflowd.store")

PING_TIMEOUT = 2.0  # seconds: a health check that takes longer counts as down
SQLITE_BUSY_TIMEOUT = 10_000  # milliseconds
PRIVATE_FILE_MODE = 0o600  # a new SQLite store file: its owner reads and writes it
GROUP_FILE_MODE = 0o640  # ... and its group reads it ([store] group_readable: backups)
START_RETRY_FIRST = 0.5  # seconds before the second attempt to reach the store at start
TIMEOUT = 5.0  # seconds: the longest wait for one answer of the server ([store] timeout)

# MySQL client error codes that mean "the server is not there right now".
_MYSQL_GONE = {2002, 2003, 2006, 2013, 2055, 1040, 1053, 1205, 1213}


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the store cannot be reached (retry later), not bad SQL."""
    if isinstance(exc, StoreUnavailable | OSError | TimeoutError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError | InterfaceError):
        orig = getattr(exc, "orig", None)
        args = getattr(orig, "args", ())
        if args and isinstance(args[0], int):
            return args[0] in _MYSQL_GONE
        text = str(orig).lower()
        return any(s in text for s in ("database is locked", "unable to open", "connect",
                                       "lost connection", "gone away"))
    return False


@dataclasses.dataclass(frozen=True)
class StoreStatistics:
    dialect: str
    schema_version: int
    pool_size: int
    checked_out: int
    healthy: bool
    last_ping_ms: float | None


class Store:
    """The daemon's state. Create with :meth:`open`, then :meth:`migrate`."""

    def __init__(self, engine: AsyncEngine, url: str, *, timeout: float = TIMEOUT) -> None:
        self.engine = engine
        self.url = url
        self.dialect: str = engine.dialect.name  # "sqlite" | "mysql" | "mariadb"
        # Seconds one wait for the server may last (MySQL/MariaDB: each statement's
        # answer, the COMMIT's, a connection's handshake); callers bound whole
        # operations with it too (the group commit).
        self.timeout = timeout
        self.schema_version = 0
        self._healthy = False
        self._last_ping_ms: float | None = None
        self._unavailable: str | None = None  # the cause, while the store is unavailable

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, pool_size: int = 10, connect_timeout: float = 5.0,
             timeout: float = TIMEOUT, group_readable: bool = False) -> Store:
        """Make the engine; no connection is attempted until first use.

        On MySQL/MariaDB a connection must be made within ``connect_timeout`` plus
        ``timeout`` seconds (TCP, then the server's handshake), and every answer of the
        server must come within ``timeout`` seconds, or the connection is dropped and
        the operation fails as unavailable (:func:`is_unavailable`): a server that
        stopped answering (frozen, swapping) never hangs a caller.
        """
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
            if path and not path.startswith(":memory:"):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                _create_private(Path(path),
                                GROUP_FILE_MODE if group_readable else PRIVATE_FILE_MODE)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT / 1000}
        else:
            kwargs.update(
                pool_size=pool_size, max_overflow=pool_size, pool_recycle=3600,
                pool_pre_ping=True,
                connect_args={"connect_timeout": int(max(1, connect_timeout))},
            )
        engine = create_async_engine(url, json_serializer=json_text, **kwargs)
        if url.startswith("sqlite"):
            sa.event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
            sa.event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
        else:
            sa.event.listen(engine.sync_engine, "connect", _mysql_on_connect)
            sa.event.listen(engine.sync_engine, "do_connect",
                            bounded_connect(engine.dialect.driver, connect_timeout, timeout))
        return cls(engine, url, timeout=timeout)

    async def close(self) -> None:
        await self.engine.dispose()

    async def wait_ready(self, *, retry_max: float = 30.0,
                         on_retry: Callable[[int, float, str], None] | None = None) -> None:
        """Connect and migrate, retrying an unreachable store with capped backoff.

        Anything but unavailability (a schema too new, bad credentials) raises at once.
        """
        delay = min(START_RETRY_FIRST, retry_max)
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.migrate()
                return
            except SchemaTooNew:
                raise
            except Exception as exc:
                if not is_unavailable(exc) or _is_auth_error(exc):
                    raise StoreError(f"store {self.safe_url}: {_short(exc)}") from None
                reason = _short(exc)
                if on_retry is not None:
                    on_retry(attempt, delay, reason)
                await anyio.sleep(delay)
                delay = min(delay * 2, retry_max)

    @property
    def safe_url(self) -> str:
        """The URL with any password masked, for logs and messages."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    # -- transactions ----------------------------------------------------------------

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction, committed on success; StoreUnavailable if down."""
        try:
            async with self.engine.begin() as conn:
                yield conn
        except StoreError:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                self.note_unavailable(_short(exc))
                raise StoreUnavailable(f"store unavailable: {_short(exc)}") from exc
            raise
        if self._unavailable is not None:
            self.note_available()

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads (autobegin; nothing is committed)."""
        try:
            async with self.engine.connect() as conn:
                yield conn
        except StoreError:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                self.note_unavailable(_short(exc))
                raise StoreUnavailable(f"store unavailable: {_short(exc)}") from exc
            raise
        if self._unavailable is not None:
            self.note_available()

    def note_unavailable(self, cause: str) -> None:
        """Record that an operation found the store unavailable; logged once per outage."""
        self._healthy = False
        if self._unavailable is None:
            self._unavailable = cause
            log.error("store.unavailable", cause=cause, store=self.safe_url,
                      timeout_s=self.timeout)

    def note_available(self) -> None:
        """Record that an operation succeeded; ends an outage :meth:`note_unavailable` began."""
        self._healthy = True
        if self._unavailable is not None:
            log.info("store.available", store=self.safe_url, after=self._unavailable)
            self._unavailable = None

    async def ping(self, limit: float = PING_TIMEOUT) -> bool:
        """True when the store answers ``SELECT 1`` within ``limit`` seconds."""
        started = time.perf_counter()
        ok = False
        cause = f"no answer to a health check within {limit:g} s"
        with anyio.move_on_after(limit):
            try:
                async with self.engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
                ok = True
            except Exception as exc:
                cause = _short(exc)
                log.warning("store.ping_failed", error=cause)
        if ok:
            self.note_available()
        else:
            self.note_unavailable(cause)
        self._last_ping_ms = (time.perf_counter() - started) * 1000 if ok else None
        return ok

    # -- dialect helpers -------------------------------------------------------------

    def insert_ignore(self, table: sa.Table) -> sa.Insert:
        """An INSERT that silently skips rows whose unique keys already exist."""
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table).on_conflict_do_nothing()
        return sa.insert(table).prefix_with("IGNORE")

    # -- migrations ------------------------------------------------------------------

    async def migrate(self) -> int:
        """Bring the schema to :data:`schema.SCHEMA_VERSION`; return the version before.

        A fresh store is created at the current version in one step; an older one walks
        the numbered steps in :mod:`segflowd.migrations`; a newer one is refused.
        """
        async with self.engine.begin() as conn:
            # A schema step (an ALTER of a big table) may take long, and no request waits
            # on it: this connection's reads are not bounded until it goes back.
            driver = (await conn.get_raw_connection()).driver_connection
            bound = read_bound(driver, None)
            try:
                before = await self._migrate_locked(conn)
            finally:
                read_bound(driver, bound)
        self.schema_version = schema.SCHEMA_VERSION
        self._healthy = True
        if before != schema.SCHEMA_VERSION:
            log.info("store.migrated", from_version=before, to_version=schema.SCHEMA_VERSION,
                     store=self.safe_url)
        return before

    async def _migrate_locked(self, conn: AsyncConnection) -> int:
        if self.dialect != "sqlite":
            lock = sa.text("SELECT GET_LOCK('segflow_migrate', 60)")
            got = (await conn.execute(lock)).scalar()
            if got != 1:
                raise StoreError("another segflowd holds the migration lock for 60 s")
        try:
            return await conn.run_sync(_migrate_sync)
        finally:
            if self.dialect != "sqlite":
                await conn.execute(sa.text("SELECT RELEASE_LOCK('segflow_migrate')"))

    async def read_schema_version(self) -> int | None:
        """The version recorded in the store, or None for an empty store."""
        async with self.connect() as conn:
            return await conn.run_sync(_read_version)

    def statistics(self) -> StoreStatistics:
        pool = self.engine.sync_engine.pool
        size = getattr(pool, "size", lambda: 1)()
        checked = getattr(pool, "checkedout", lambda: 0)()
        return StoreStatistics(
            dialect=self.dialect, schema_version=self.schema_version, pool_size=int(size),
            checked_out=int(checked), healthy=self._healthy, last_ping_ms=self._last_ping_ms,
        )


# Types json.dumps does not write (or writes as their base type) go to json.dumps.
_ORJSON_STRICT = (orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
                  | orjson.OPT_PASSTHROUGH_SUBCLASS)


def json_text(value: object) -> str:
    """The text of a JSON column's value: what ``json.dumps`` writes, but from orjson.

    About ten times faster (every event's attributes pass here). orjson writes non-ASCII
    as UTF-8 rather than ``\\u`` escapes and no blanks after separators: the same JSON
    to every reader. Whatever orjson will not write as ``json.dumps`` would (integers
    past 64 bits, keys that are not strings, datetimes, dataclasses, subclasses of
    str, int, dict and list) goes to
    ``json.dumps``, so those values are stored, or refused, as they always were. A NaN or
    infinite float becomes null (``json.dumps`` would write ``NaN``, which is not JSON).
    """
    try:
        return orjson.dumps(value, option=_ORJSON_STRICT).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value)


def _create_private(path: Path, mode: int) -> None:
    """Create the SQLite file readable by its owner only (0600; 0640 when its group may
    read it), whatever the umask: it holds addresses and events. An existing file keeps
    the mode its operator gave it (SQLite gives its -wal and -shm files the database
    file's mode)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _sqlite_on_connect(dbapi_conn: Any, _record: object) -> None:
    _stop_once(getattr(dbapi_conn, "_connection", None))
    # pysqlite's own transaction handling is off so BEGIN is ours (see _sqlite_on_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT:d}")
    cur.close()


def _stop_once(driver: Any) -> None:
    """Make the aiosqlite connection's ``stop()`` answer once, then return None.

    A query cancelled mid-way (a shutdown, a timeout) makes SQLAlchemy close the
    connection in a shielded task and, the wait for it being cancelled too, stop
    aiosqlite's thread at once. The close then calls ``stop()`` again and waits for an
    answer from the thread that has just ended: that task never finishes, and at exit
    ``asyncio.run`` waits for it forever (the daemon hangs after SIGTERM). With a second
    ``stop()`` answering None there is nothing to wait for.
    """
    stop = getattr(driver, "stop", None)
    if not callable(stop):  # not aiosqlite 0.22's connection: nothing to mend
        return
    stopped = False

    def stop_once() -> object:
        nonlocal stopped
        if stopped:
            return None
        stopped = True
        return stop()

    driver.stop = stop_once


def _sqlite_on_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock up front, so two writers queue on busy_timeout
    # instead of failing with "database is locked" on lock upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _mysql_on_connect(dbapi_conn: Any, _record: object) -> None:
    cur = dbapi_conn.cursor()
    # Sessions speak UTC; strict mode turns silent truncation into errors.
    cur.execute("SET time_zone = '+00:00'")
    cur.execute("SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'")
    cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    cur.close()


def _read_version(conn: Connection) -> int | None:
    insp = sa.inspect(conn)
    if not insp.has_table(schema.schema_version.name):
        return None
    row = conn.execute(sa.select(schema.schema_version.c.version)
                       .where(schema.schema_version.c.id == 1)).first()
    return int(row[0]) if row else None


def _steps() -> dict[int, Callable[[Connection], None]]:
    """Numbered migration steps: module ``mNNNN_name`` in segflowd/migrations upgrades to NNNN."""
    out: dict[int, Callable[[Connection], None]] = {}
    for info in pkgutil.iter_modules(migrations.__path__):
        if info.name.startswith("m") and info.name[1:5].isdigit():
            mod = importlib.import_module(f"{migrations.__name__}.{info.name}")
            out[int(info.name[1:5])] = mod.upgrade
    return out


def _stamp(conn: Connection, version: int, now: dt.datetime) -> None:
    from . import __version__

    t = schema.schema_version
    values = {"version": version, "migrated_at": now, "migrated_by": f"segflowd {__version__}"}
    if conn.execute(sa.update(t).where(t.c.id == 1).values(**values)).rowcount == 0:
        conn.execute(sa.insert(t).values(id=1, **values))


def _migrate_sync(conn: Connection) -> int:
    current = _read_version(conn)
    target = schema.SCHEMA_VERSION
    now = utcnow()
    if current is None:
        existing = set(sa.inspect(conn).get_table_names()) & set(schema.metadata.tables)
        if existing:
            raise StoreError(
                "the store has tables named like Segflow's ("
                + ", ".join(sorted(existing))
                + ") but no segflow_schema version: it is not a Segflow store; "
                "point [store] url at an empty database"
            )
        schema.metadata.create_all(conn)
        _stamp(conn, target, now)
        return 0
    if current > target:
        raise SchemaTooNew(
            f"the store's schema is version {current}, newer than this segflowd knows "
            f"({target}): upgrade segflowd, or point [store] url at another database"
        )
    steps = _steps()
    for version in range(current + 1, target + 1):
        if version not in steps:  # pragma: no cover - guarded by a unit test
            raise StoreError(f"no migration step to schema version {version}")
        steps[version](conn)
        _stamp(conn, version, now)
    return current


def _is_auth_error(exc: BaseException) -> bool:
    args: tuple[object, ...] = getattr(getattr(exc, "orig", None), "args", ())
    return len(args) > 0 and args[0] in (1044, 1045, 1049)


def _short(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's statement dump and links."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return text.split("\n", 1)[0][:300] or type(exc).__name__
