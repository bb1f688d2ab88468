"""Data sources: named, read-only connections to customer databases (DirectFlow).

``[sources.NAME]`` in segflow.toml gives ``url`` (or ``url_env``): PostgreSQL through
asyncpg (``postgresql://`` is taken to mean ``postgresql+asyncpg://``) or MySQL/MariaDB
through aiomysql (``mysql://``). Each source has its own small pool. What a caller may
rely on:

* Read-only is enforced by the database session, not by reading the SQL, and holds per
  query: PostgreSQL sessions start with ``default_transaction_read_only=on``, every query
  runs in a ``READ ONLY`` transaction, and a connection's session state (settings,
  advisory locks, LISTENs, cursors, temporary tables) is reset when it returns to the
  pool. MySQL runs ``SET SESSION TRANSACTION READ ONLY`` and the statement time limit
  before every query, so a query that set the session READ WRITE cannot leave it so
  for the next. An INSERT, UPDATE, DELETE or DDL statement fails with the database's
  own refusal. Only the database role's privileges are a real boundary: a superuser
  can leave a read-only transaction (``dblink_exec``, ``COPY ... TO PROGRAM``).
* A query is one statement: MySQL connections are made without multi-statement
  support, and SQL with a ``;`` inside it is refused before it is sent.
* Every statement has a time limit (``statement_timeout``, seconds, default 30).
* Any failure is a :class:`~segflowd.errors.SourceError` naming the source and carrying
  the database's message; it fails that one operation, never the daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
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
from ..placeholders import Dialect, Placeholders, parse
from ..store import is_unavailable

if TYPE_CHECKING:
    from ..http import Router
    from ..kernel import Kernel

__all__ = ["Row", "Source", "SourceLookup", "SourceService", "SourceStatistics",
           "SourcesStatistics", "StaticSources", "open_source"]

log = structlog.get_logger("segflowd.sources")

DEFAULT_POOL_SIZE = 5  # connections per source
DEFAULT_STATEMENT_TIMEOUT = 30.0  # seconds a customer-database statement may run
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds to open a connection to a source
FETCH_PARTITION = 1000  # rows read from a server-side cursor at a time
# What a PostgreSQL connection returning to the pool forgets: DISCARD ALL but for the
# prepared statements, which the driver keeps caching (their plans are the same anyway).
_CLIENT_MULTI_STATEMENTS = 1 << 16  # pymysql.constants.CLIENT.MULTI_STATEMENTS
_MYSQL_SESSION = {  # (MariaDB?, has transaction_read_only?): read-only plus the time limit
    (True, True): "SET SESSION transaction_read_only = 1, SESSION max_statement_time = %s",
    (True, False): "SET SESSION tx_read_only = 1, SESSION max_statement_time = %s",
    (False, True): "SET SESSION transaction_read_only = 1, SESSION max_execution_time = %s",
    (False, False): "SET SESSION tx_read_only = 1, SESSION max_execution_time = %s",
}
_PG_RESET = ("CLOSE ALL; RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); "
             "DISCARD TEMP; DISCARD SEQUENCES")

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


class Source:
    """One customer database: a pool, read-only sessions, a statement timeout."""

    def __init__(self, name: str, engine: AsyncEngine, *, statement_timeout: float) -> None:
        self.name = name
        self.engine = engine
        self.dialect: Dialect = (
            "postgresql" if engine.dialect.name == "postgresql" else "mysql")
        self.statement_timeout = statement_timeout
        self.safe_url = engine.url.render_as_string(hide_password=True)
        self.queries = 0
        self.errors = 0
        self.last_error: str | None = None

    async def fetch(self, sql: str, values: Mapping[str, object], *, what: str,
                    limit: int | None = None) -> list[Row]:
        """All rows (at most ``limit``) of ``sql`` with its placeholders bound from ``values``."""
        stmt = self.statement(sql, values, what=what)
        if limit == 1:  # preload and conditions, at send time: one round trip, no cursor
            return await self._first(stmt, what=what)
        rows: list[Row] = []
        async with contextlib.aclosing(self.stream(stmt, what=what)) as batches:
            async for batch in batches:
                rows.extend(batch)
                if limit is not None and len(rows) >= limit:
                    return rows[:limit]
        return rows

    def statement(self, sql: str, values: Mapping[str, object], *, what: str) -> TextClause:
        """``sql`` read with this database's lexical rules, its placeholders bound.

        SourceError when the SQL is not one statement with its placeholders in value
        positions; PlaceholderError when ``values`` lacks one.
        """
        return _parsed(sql, self.dialect).bind(values, source=self.name, what=what)

    async def stream(self, stmt: TextClause, *, what: str,
                     partition: int = FETCH_PARTITION) -> AsyncGenerator[list[Row]]:
        """The rows of ``stmt`` in lists of ``partition``, from a server-side cursor.

        A consumer that stops early should close the iterator (``contextlib.aclosing``):
        that closes the cursor and returns the connection at once.
        """
        self.queries += 1
        for attempt in range(2):
            sent = False
            try:
                async with self._connect() as conn:
                    result = await conn.stream(stmt)
                    try:
                        keys = list(result.keys())
                        async for part in result.partitions(partition):
                            sent = True
                            yield [dict(zip(keys, r, strict=True)) for r in part]
                    finally:
                        with anyio.CancelScope(shield=True):
                            await result.close()
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

    async def columns(self, stmt: TextClause, *, what: str) -> list[str]:
        """The columns ``stmt`` returns, learnt without fetching a row: it runs as
        ``SELECT * FROM (stmt) AS q LIMIT 0`` in the read-only session (``check``)."""
        self.queries += 1
        probe: sa.Select[tuple[object]] = sa.select(sa.literal_column("*")).select_from(
            stmt.columns().subquery("q")).limit(0)
        try:
            async with self._connect() as conn:
                return list((await conn.execute(probe)).keys())
        except Exception as exc:
            raise self._error(exc, what) from None

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn = await conn.execution_options(postgresql_readonly=True)
            else:
                # Per query, not per connection: the last query on this pooled connection
                # may have run SET SESSION TRANSACTION READ WRITE or lifted the time limit.
                sql, params = conn.info["segflow_session"]
                await conn.exec_driver_sql(sql, params)
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
        connect_args = {"connect_timeout": int(max(1, connect_timeout)),
                        "async_creator_fn": _mysql_connect}
    engine = create_async_engine(
        # No pre-ping: it costs a round trip per query (about 40% of a preload); a pooled
        # connection found closed is instead retried once on a fresh one (_stale).
        url, pool_size=pool_size, max_overflow=0, pool_recycle=1800,
        connect_args=connect_args)
    if driver.startswith("postgresql"):
        sa.event.listen(engine.sync_engine, "connect", _pg_on_connect)
        sa.event.listen(engine.sync_engine, "reset", _pg_on_reset)
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
def _parsed(sql: str, dialect: Dialect) -> Placeholders:
    try:
        return parse(sql, dialect)
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
    # A quoted placeholder is a string, as DirectFlow's '<%= id %>' literal was, and
    # PostgreSQL coerces such a literal to the type of the column it meets. So the types
    # a literal is commonly compared with travel in text format: the server parses '42'
    # for an int column, '2024-05-01' for a date and 'true' for a boolean exactly as it
    # parses the literal. Results decode to the same Python values as before; a text the
    # decoder cannot read (a BC date, 'infinity') stays the string PostgreSQL sent.
    async def codecs(conn: Any) -> None:
        for typ, decoder in _PG_TEXT_CODECS.items():
            await conn.set_type_codec(typ, schema="pg_catalog", encoder=_pg_text,
                                      decoder=decoder, format="text")

    dbapi_conn.run_async(codecs)


def _pg_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return str(value)


def _lenient(parse: Callable[[str], object]) -> Callable[[str], object]:
    def decode(text: str) -> object:
        try:
            return parse(text)
        except ValueError:
            return text
    return decode


_PG_TEXT_CODECS: dict[str, Callable[[str], object]] = {
    "int2": int, "int4": int, "int8": int,
    "bool": lambda text: text == "t",
    "date": _lenient(dt.date.fromisoformat),
    "timestamp": _lenient(dt.datetime.fromisoformat),
    # in UTC, as the binary codec gave it, whatever the session's TimeZone
    "timestamptz": _lenient(lambda text: dt.datetime.fromisoformat(text).astimezone(dt.UTC)),
}


def _pg_on_reset(dbapi_conn: Any, _record: object, state: Any) -> None:
    # A connection back from a query: roll back, then forget what the query left in the
    # session (an advisory lock, a LISTEN, a setting it committed). The pool rolls back
    # again after this, which is then a no-op. An error here discards the connection.
    if state.terminate_only or not state.asyncio_safe:
        return
    dbapi_conn.rollback()

    async def reset(conn: Any) -> None:
        await conn.execute(_PG_RESET)

    dbapi_conn.run_async(reset)


async def _mysql_connect(*args: Any, **kwargs: Any) -> Any:
    # aiomysql always asks the server for multi-statement support; a source never needs
    # it, and without it "...; DROP TABLE t" cannot run whatever reaches the server.
    import aiomysql  # type: ignore[import-untyped]  # no type information shipped

    conn = aiomysql.Connection(*args, **kwargs)
    conn.client_flag &= ~_CLIENT_MULTI_STATEMENTS
    await conn._connect()  # what aiomysql.connect() does after building the Connection
    return conn


def _mysql_on_connect(dbapi_conn: Any, record: Any, *, timeout: float) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("SELECT VERSION()")
    mariadb = "mariadb" in str(cur.fetchone()[0]).lower()
    newer = _has_var(cur, "transaction_read_only")  # tx_read_only before MariaDB 11.1
    # One statement, run before every query (Source._connect): read-only and the limit.
    record.info["segflow_session"] = (_MYSQL_SESSION[mariadb, newer],
                                      (float(timeout),) if mariadb else (int(timeout * 1000),))
    cur.execute(*record.info["segflow_session"])
    cur.close()


def _has_var(cur: Any, name: str) -> bool:
    cur.execute("SHOW VARIABLES LIKE %s", (name,))
    return bool(cur.fetchall())


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
