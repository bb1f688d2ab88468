"""Data sources: named, read-only connections to customer databases (DirectFlow).

``[sources.NAME]`` in segflow.toml gives ``url`` (or ``url_env``): PostgreSQL through
asyncpg (``postgresql://`` is taken to mean ``postgresql+asyncpg://``) or MySQL/MariaDB
through aiomysql (``mysql://``). Each source has its own small pool. What a caller may
rely on:

* Read-only is enforced by the database session, not by reading the SQL: PostgreSQL
  sessions start with ``default_transaction_read_only=on`` and every query runs in a
  ``READ ONLY`` transaction; MySQL sessions run ``SET SESSION TRANSACTION READ ONLY``.
  An INSERT, UPDATE, DELETE or DDL statement fails with the database's own refusal.
* Every statement has a time limit (``statement_timeout``, seconds, default 30).
* Any failure is a :class:`~segflowd.errors.SourceError` naming the source and carrying
  the database's message; it fails that one operation, never the daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import decimal
import functools
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import sqlalchemy as sa
import structlog
from anyio.abc import TaskStatus
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import TextClause

from ..config import NamedTable
from ..errors import SourceError
from ..placeholders import Placeholders, parse
from ..store import is_unavailable

if TYPE_CHECKING:
    from ..http import Router
    from ..kernel import Kernel

__all__ = ["Row", "Source", "SourceLookup", "SourceService", "SourceStatistics",
           "SourcesStatistics", "StaticSources", "json_value", "open_source"]

log = structlog.get_logger("segflowd.sources")

DEFAULT_POOL_SIZE = 5  # connections per source
DEFAULT_STATEMENT_TIMEOUT = 30.0  # seconds a customer-database statement may run
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds to open a connection to a source
FETCH_PARTITION = 1000  # rows read from a server-side cursor at a time

Row = dict[str, object]

_DRIVERS = {
    "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "mysql": "mysql+aiomysql", "mariadb": "mysql+aiomysql", "mysql+aiomysql": "mysql+aiomysql",
    "mariadb+aiomysql": "mysql+aiomysql",
}


@dataclasses.dataclass(frozen=True)
class SourceStatistics:
    name: str
    dialect: str
    url: str  # password masked
    queries: int
    errors: int
    last_error: str | None
    pool_checked_out: int


@dataclasses.dataclass(frozen=True)
class SourcesStatistics:
    sources: tuple[SourceStatistics, ...]


def json_value(value: object) -> object:
    """A customer-database value as JSON (user attributes, template context, replies)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


class Source:
    """One customer database: a pool, read-only sessions, a statement timeout."""

    def __init__(self, name: str, engine: AsyncEngine, *, statement_timeout: float) -> None:
        self.name = name
        self.engine = engine
        self.dialect: str = "postgresql" if engine.dialect.name == "postgresql" else "mysql"
        self.statement_timeout = statement_timeout
        self.safe_url = engine.url.render_as_string(hide_password=True)
        self.queries = 0
        self.errors = 0
        self.last_error: str | None = None

    async def fetch(self, sql: str, values: Mapping[str, object], *, what: str,
                    limit: int | None = None) -> list[Row]:
        """All rows (at most ``limit``) of ``sql`` with its placeholders bound from ``values``."""
        stmt = _parsed(sql).bind(values, source=self.name, what=what)
        if limit == 1:  # preload and conditions, at send time: one round trip, no cursor
            return await self._first(stmt, what=what)
        rows: list[Row] = []
        async for batch in self.stream(stmt, what=what):
            rows.extend(batch)
            if limit is not None and len(rows) >= limit:
                return rows[:limit]
        return rows

    async def stream(self, stmt: TextClause, *, what: str,
                     partition: int = FETCH_PARTITION) -> AsyncIterator[list[Row]]:
        """The rows of ``stmt`` in lists of ``partition``, from a server-side cursor."""
        self.queries += 1
        for attempt in range(2):
            sent = False
            try:
                async with self._connect() as conn:
                    result = await conn.stream(stmt)
                    keys = list(result.keys())
                    async for part in result.partitions(partition):
                        sent = True
                        yield [dict(zip(keys, r, strict=True)) for r in part]
                return
            except SourceError:
                raise
            except Exception as exc:
                if attempt == 0 and not sent and _stale(exc):
                    continue  # a pooled connection the database closed: once more, fresh
                raise self._error(exc, what) from None

    async def _first(self, stmt: TextClause, *, what: str) -> list[Row]:
        self.queries += 1
        for attempt in range(2):
            try:
                async with self._connect() as conn:
                    result = await conn.execute(stmt)
                    keys = list(result.keys())
                    first = result.first()
                return [] if first is None else [dict(zip(keys, first, strict=True))]
            except SourceError:
                raise
            except Exception as exc:
                if attempt == 0 and _stale(exc):
                    continue  # a pooled connection the database closed: once more, fresh
                raise self._error(exc, what) from None
        raise AssertionError("unreachable: the second attempt returns or raises")

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn = await conn.execution_options(postgresql_readonly=True)
            yield conn

    def _error(self, exc: BaseException, what: str) -> SourceError:
        message = _db_message(exc)
        self.errors += 1
        self.last_error = message
        if _unreachable(exc):
            err = SourceError(self.name, f"data source {self.name!r} ({self.safe_url}) is "
                                         f"unreachable: {message}")
        else:
            err = SourceError(self.name, f"{what} on data source {self.name!r} failed: "
                                         f"{message}")
        log.warning("source.query_failed", source=self.name, what=what, error=message)
        return err

    def statistics(self) -> SourceStatistics:
        pool = self.engine.sync_engine.pool
        checked = getattr(pool, "checkedout", lambda: 0)()
        return SourceStatistics(
            name=self.name, dialect=self.dialect, url=self.safe_url, queries=self.queries,
            errors=self.errors, last_error=self.last_error, pool_checked_out=int(checked))

    async def close(self) -> None:
        await self.engine.dispose()


def open_source(table: NamedTable) -> Source:
    """Build a source from its ``[sources.NAME]`` table; no connection is made yet.

    SourceError for a bad URL or option (the message names the key).
    """
    name = table.name
    raw = table.get_str("url")
    try:
        url = sa.engine.make_url(raw)
    except Exception:
        raise SourceError(name, f"sources.{name}.url is not a database URL") from None
    driver = _DRIVERS.get(url.drivername)
    if driver is None:
        raise SourceError(name, f"sources.{name}.url: {url.drivername!r} is not supported; "
                                "use postgresql:// or mysql://")
    url = url.set(drivername=driver)
    pool_size = int(_number(table, "pool_size", DEFAULT_POOL_SIZE))
    timeout = _number(table, "statement_timeout", DEFAULT_STATEMENT_TIMEOUT)
    connect_timeout = _number(table, "connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    if driver.startswith("postgresql"):
        connect_args: dict[str, Any] = {
            "timeout": connect_timeout,
            "server_settings": {
                "default_transaction_read_only": "on",
                "statement_timeout": str(int(timeout * 1000)),
                "application_name": "segflowd",
            },
        }
    else:
        connect_args = {"connect_timeout": int(max(1, connect_timeout))}
    engine = create_async_engine(
        # No pre-ping: it costs a round trip per query (about 40% of a preload); a pooled
        # connection found closed is instead retried once on a fresh one (_stale).
        url, pool_size=pool_size, max_overflow=0, pool_recycle=1800,
        connect_args=connect_args)
    if driver.startswith("postgresql"):
        sa.event.listen(engine.sync_engine, "connect", _pg_on_connect)
    else:
        sa.event.listen(engine.sync_engine, "connect",
                        functools.partial(_mysql_on_connect, timeout=timeout))
    return Source(name, engine, statement_timeout=timeout)


class SourceLookup(Protocol):
    """Finds a source by name (SourceError when there is none)."""

    def get(self, name: str) -> Source: ...


class StaticSources:
    """A fixed set of sources, for tools that run without the daemon (``discover``)."""

    def __init__(self, sources: Sequence[Source]) -> None:
        self.sources = {s.name: s for s in sources}

    def get(self, name: str) -> Source:
        try:
            return self.sources[name]
        except KeyError:
            raise SourceError(name, f"no data source {name!r} is open") from None

    async def aclose(self) -> None:
        for s in self.sources.values():
            await s.close()


class SourceService:
    """The configured sources, their pools, and DirectFlow conditions (ConditionRunner)."""

    name = "sources"

    def __init__(self, k: Kernel, sources: Sequence[Source] | None = None) -> None:
        self.k = k
        self.sources: dict[str, Source] = {}
        self.problems: list[str] = []
        if sources is not None:
            self.sources = {s.name: s for s in sources}
        else:
            for table in k.config.sources.values():
                try:
                    self.sources[table.name] = open_source(table)
                except SourceError as exc:
                    # A bad source fails what uses it, not the daemon.
                    self.problems.append(str(exc))
                    log.error("source.invalid", source=table.name, error=str(exc))
        k.stats["sources"] = self.statistics

    def get(self, name: str) -> Source:
        """The source ``name``; SourceError when it is not configured."""
        try:
            return self.sources[name]
        except KeyError:
            known = ", ".join(sorted(self.sources)) or "none configured"
            raise SourceError(name, f"no data source {name!r}: add [sources.{name}] to "
                                    f"segflow.toml (sources: {known})") from None

    async def condition(self, source: str, sql: str, params: Mapping[str, object]) -> bool:
        """The bool of the first row's ``result`` column; no row is False."""
        rows = await self.get(source).fetch(sql, params, what="condition", limit=1)
        if not rows:
            return False
        if "result" not in rows[0]:
            cols = ", ".join(rows[0]) or "none"
            raise SourceError(source, f"condition on data source {source!r} returned no "
                                      f"'result' column (columns: {cols})")
        return bool(rows[0]["result"])

    def register_routes(self, router: Router) -> None:
        return None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        for name, src in self.sources.items():
            log.info("source.configured", source=name, dialect=src.dialect, url=src.safe_url)
        task_status.started()
        await anyio.sleep_forever()

    async def drain(self) -> None:
        with anyio.CancelScope(shield=True):
            for src in self.sources.values():
                await src.close()

    async def aclose(self) -> None:
        await self.drain()

    def statistics(self) -> SourcesStatistics:
        return SourcesStatistics(tuple(s.statistics() for s in self.sources.values()))


@functools.lru_cache(maxsize=512)
def _parsed(sql: str) -> Placeholders:
    try:
        return parse(sql)
    except ValueError as exc:
        raise SourceError("", str(exc)) from None


def _number(table: NamedTable, key: str, default: float) -> float:
    value = table.options.get(key, default)
    try:
        number = float(value)  # type: ignore[arg-type]  # str from env or a TOML number
    except (TypeError, ValueError):
        raise SourceError(table.name, f"sources.{table.name}.{key} must be a number, "
                                      f"not {value!r}") from None
    if number <= 0:
        raise SourceError(table.name, f"sources.{table.name}.{key} must be positive")
    return number


def _pg_on_connect(dbapi_conn: Any, _record: object) -> None:
    # A quoted placeholder is a string, as DirectFlow's '<%= id %>' literal was; PostgreSQL
    # would coerce such a literal to an integer column's type, so integers travel in text
    # format here: the server parses '42' for an int column exactly as it parses a literal.
    async def codecs(conn: Any) -> None:
        for typ in ("int2", "int4", "int8"):
            await conn.set_type_codec(typ, schema="pg_catalog", encoder=str, decoder=int,
                                      format="text")

    dbapi_conn.run_async(codecs)


def _mysql_on_connect(dbapi_conn: Any, _record: object, *, timeout: float) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("SET SESSION TRANSACTION READ ONLY")
    cur.execute("SELECT VERSION()")
    version = str(cur.fetchone()[0])
    if "mariadb" in version.lower():
        cur.execute("SET SESSION max_statement_time = %s", (float(timeout),))
    else:
        cur.execute("SET SESSION max_execution_time = %s", (int(timeout * 1000),))
    cur.close()


def _stale(exc: BaseException) -> bool:
    """A pooled connection that the database (or a proxy) closed since its last use."""
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _unreachable(exc: BaseException) -> bool:
    """The store's notion of "cannot be reached", plus what only a customer's database
    says on connect: a wrong password or an unknown database (MySQL and PostgreSQL)."""
    if is_unavailable(exc):
        return True
    if isinstance(exc, OperationalError | InterfaceError):
        orig = getattr(exc, "orig", None)
        args = getattr(orig, "args", ())
        if args and isinstance(args[0], int):
            return args[0] in (1045, 1049)  # access denied, unknown database
        text = str(orig).lower()
        return any(s in text for s in ("refused", "does not exist",
                                       "password authentication", "timeout"))
    return False


def _db_message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    args: tuple[object, ...] = tuple(getattr(orig, "args", ()))
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        return f"{args[1]} (error {args[0]})"[:500]  # MySQL: (code, message)
    text = str(orig if orig is not None else exc) or type(exc).__name__
    # asyncpg errors arrive as "<class 'asyncpg.exceptions.X'>: message"
    if text.startswith("<class '") and ">: " in text:
        text = text.split(">: ", 1)[1]
    return text.split("\n", 1)[0][:500]
