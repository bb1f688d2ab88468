"""The group committer's events INSERT, run on the driver's own connection.

Through SQLAlchemy's executemany path an events row costs about 20 µs of CPython time
(execution context, bind processors, insertmanyvalues, and on aiosqlite four trips to
its thread per statement), paid on every flush. :class:`EventInserter` has SQLAlchemy
compile the very same Core statement (``Store.insert_ignore(events)`` with RETURNING)
once per row count, applies the bind processors SQLAlchemy would apply, and runs it
with one driver call inside the caller's transaction; parameters stay bound. The ids
of rows skipped as duplicates are looked up the same way.

On SQLite every call into the driver is a trip to aiosqlite's thread and back (about
35 µs of CPU). A flush that is only this INSERT can have it as a transaction of its own
(``alone``): BEGIN IMMEDIATE, the INSERT, the look-up and COMMIT in one trip, where
SQLAlchemy's transaction takes five.

A driver it does not know (``supported`` is False) is left to the SQLAlchemy path, and
driver errors come out as the SQLAlchemy exceptions that path would raise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import schema
from ..store import Store

__all__ = ["COLUMNS", "EventInserter"]

# The order of the values of each row given to EventInserter.insert.
COLUMNS = ("user_id", "anonymous_id", "name", "attributes", "dedupe_key", "created_at",
           "received_at")
MAX_ROWS = 500  # rows per statement: 3,500 parameters, within SQLite's and MySQL's limits
LOOKUP_KEYS = 500  # dedupe keys per look-up of the rows a flush skipped
_DRIVERS = ("aiosqlite", "aiomysql")  # driver connections whose API this speaks

Row = tuple[Any, ...]


def _aiosqlite_runs_functions() -> bool:
    import aiosqlite

    return (callable(getattr(aiosqlite.Connection, "_execute", None))
            and isinstance(getattr(aiosqlite.Connection, "_conn", None), property))


class EventInserter:
    """INSERT-or-skip of events rows returning ``(id, dedupe_key)`` of the new ones."""

    def __init__(self, store: Store, dialect: sa.Dialect) -> None:
        ev = schema.events
        self._dialect = dialect
        self._statement = store.insert_ignore(ev)
        self._returning = (ev.c.id, ev.c.dedupe_key)
        processors = [ev.c[name].type.dialect_impl(dialect).bind_processor(dialect)
                      for name in COLUMNS]
        self._processors: list[tuple[int, Callable[[Any], Any]]] = [
            (i, p) for i, p in enumerate(processors) if p is not None]
        # By row count: at most MAX_ROWS statements, compiled once each (~1 MB at most).
        self._compiled: dict[int, tuple[str, list[int] | None]] = {}
        dbapi = dialect.loaded_dbapi
        self._dbapi_error: type[Exception] = dbapi.Error
        # SQLAlchemy's aiomysql cursor class: it skips the SHOW WARNINGS round trip (and
        # Python warning) aiomysql makes after every INSERT IGNORE that skipped a row.
        self._cursor_class: Any = getattr(dbapi, "Cursor", None)
        self.supported = (dialect.driver in _DRIVERS and dialect.positional
                          and (dialect.driver == "aiosqlite" or self._cursor_class is not None)
                          and bool(dialect.insert_executemany_returning))
        # insert(alone=True): SQLite, whose driver runs a whole transaction in one trip to
        # its thread. On MySQL a transaction costs no extra trip to begin. The trip uses
        # aiosqlite's own queue (as SQLAlchemy's adapter does); an aiosqlite without it
        # leaves every flush to SQLAlchemy's transaction.
        self.commits_alone = (self.supported and dialect.driver == "aiosqlite"
                              and _aiosqlite_runs_functions())
        self._lookups: dict[int, str] = {}

    def _sql(self, n: int) -> tuple[str, list[int] | None]:
        """The statement for ``n`` rows and the order of its parameters (None: row-major)."""
        cached = self._compiled.get(n)
        if cached is not None:
            return cached
        width = len(COLUMNS)
        values: list[dict[str, Any]] = [
            {name: sa.bindparam(f"r{i}c{j}") for j, name in enumerate(COLUMNS)}
            for i in range(n)]
        compiled = self._statement.values(values).returning(*self._returning).compile(
            dialect=self._dialect)
        slot = {f"r{i}c{j}": i * width + j for i in range(n) for j in range(width)}
        order = [slot[name] for name in compiled.positiontup or ()]
        if sorted(order) != list(range(n * width)):
            raise RuntimeError("the compiled events INSERT does not bind every value once")
        cached = (str(compiled), None if order == list(range(n * width)) else order)
        self._compiled[n] = cached
        return cached

    def _lookup_sql(self, n: int) -> str:
        """SELECT dedupe_key, id of the events with one of ``n`` dedupe keys (bound)."""
        cached = self._lookups.get(n)
        if cached is None:
            ev = schema.events
            statement = sa.select(ev.c.dedupe_key, ev.c.id).where(
                ev.c.dedupe_key.in_([sa.bindparam(f"k{i}") for i in range(n)]))
            cached = self._lookups[n] = str(statement.compile(dialect=self._dialect))
        return cached

    def _statements(self, rows: Sequence[Row]) -> list[tuple[str, list[Any]]]:
        """The INSERTs for ``rows``, with their values processed as SQLAlchemy would."""
        out: list[tuple[str, list[Any]]] = []
        for start in range(0, len(rows), MAX_ROWS):
            chunk = rows[start:start + MAX_ROWS]
            sql, order = self._sql(len(chunk))
            flat: list[Any] = []
            # Most rows of a flush share one datetime object (its received time): processed
            # once per column, not once per row.
            last: dict[int, tuple[Any, Any]] = {}
            for row in chunk:
                values = list(row)
                for i, process in self._processors:
                    value = values[i]
                    seen = last.get(i)
                    if seen is not None and seen[0] is value:
                        values[i] = seen[1]
                    else:
                        values[i] = processed = process(value)
                        last[i] = (value, processed)
                flat += values
            out.append((sql, flat if order is None else [flat[k] for k in order]))
        return out

    def _lookups_for(self, keys: Sequence[str]) -> list[tuple[str, list[Any]]]:
        return [(self._lookup_sql(len(chunk)), list(chunk))
                for chunk in (keys[i:i + LOOKUP_KEYS] for i in range(0, len(keys), LOOKUP_KEYS))]

    async def insert(self, conn: AsyncConnection, rows: Sequence[Row], *, alone: bool = False
                     ) -> tuple[list[tuple[int, str | None]], dict[str, int]]:
        """Insert ``rows`` (values in :data:`COLUMNS` order, dedupe keys distinct).

        Returns ``(id, dedupe_key)`` of each new row, and the stored id of each dedupe key
        that was skipped (stored before). With ``alone`` (only where :attr:`commits_alone`,
        and no transaction open on ``conn``) the INSERT and the look-up are a transaction
        of their own, made in one trip to the driver's thread; otherwise they run in the
        caller's transaction.
        """
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        if driver is None:  # pragma: no cover - an invalidated connection fails before this
            raise sa.exc.InvalidRequestError("the connection has no driver connection")
        statements = self._statements(rows)
        keys = [row[4] for row in rows if row[4] is not None]
        sql: str = statements[0][0] if statements else ""
        params: list[Any] = []
        try:
            if alone:
                if not self.commits_alone:
                    raise RuntimeError("this store's driver cannot commit the INSERT alone")
                # aiosqlite runs the function in its connection's thread (SQLAlchemy's own
                # aiosqlite adapter queues work there the same way).
                return cast(tuple[list[tuple[int, str | None]], dict[str, int]],
                            await driver._execute(self._alone, driver._conn, statements, keys))
            got: list[tuple[Any, ...]] = []
            for sql, params in statements:
                got += await self._run(driver, sql, params)
            inserted = [(int(row_id), key) for row_id, key in got]
            existing: dict[str, int] = {}
            new = {key for _, key in inserted}
            for sql, params in self._lookups_for([k for k in keys if k not in new]):
                existing.update((key, int(row_id)) for key, row_id in
                                await self._run(driver, sql, params))
            return inserted, existing
        except self._dbapi_error as exc:
            error: Any = exc  # the DBAPI's own Error, as is_disconnect expects
            gone = self._dialect.is_disconnect(error, None, None)
            if gone:  # as SQLAlchemy does: the pool must not hand this connection out
                await conn.invalidate(exc)
            raise sa.exc.DBAPIError.instance(
                sql, params, exc, self._dbapi_error, dialect=self._dialect,
                connection_invalidated=gone,
            ) from exc

    async def _run(self, driver: Any, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        if self._dialect.driver == "aiosqlite":
            return list(await driver.execute_fetchall(sql, params))
        async with driver.cursor(self._cursor_class) as cursor:
            await cursor.execute(sql, params)
            return list(await cursor.fetchall())

    def _alone(self, db: Any, statements: list[tuple[str, list[Any]]], keys: list[str]
               ) -> tuple[list[tuple[int, str | None]], dict[str, int]]:
        """In the sqlite3 connection's own thread: the whole transaction."""
        db.execute("BEGIN IMMEDIATE")  # waits on busy_timeout for another writer
        try:
            inserted: list[tuple[int, str | None]] = []
            for sql, params in statements:
                inserted += [(int(row_id), key) for row_id, key in
                             db.execute(sql, params).fetchall()]
            new = {key for _, key in inserted}
            existing: dict[str, int] = {}
            for sql, params in self._lookups_for([k for k in keys if k not in new]):
                existing.update((key, int(row_id)) for key, row_id in
                                db.execute(sql, params).fetchall())
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return inserted, existing
