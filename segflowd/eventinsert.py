"""The group committer's events INSERT, run on the driver's own connection.

Through SQLAlchemy's executemany path an events row costs about 20 µs of CPython time
(execution context, bind processors, insertmanyvalues, and on aiosqlite four trips to
its thread per statement), paid on every flush. :class:`EventInserter` has SQLAlchemy
compile the very same Core statement (``Store.insert_ignore(events)`` with RETURNING)
once per row count, applies the bind processors SQLAlchemy would apply, and runs it
with one driver call inside the caller's transaction; parameters stay bound. A driver
it does not know (``supported`` is False) is left to the SQLAlchemy path, and driver
errors come out as the SQLAlchemy exceptions that path would raise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema
from .store import Store

__all__ = ["COLUMNS", "EventInserter"]

# The order of the values of each row given to EventInserter.insert.
COLUMNS = ("user_id", "anonymous_id", "name", "attributes", "dedupe_key", "created_at",
           "received_at")
MAX_ROWS = 500  # rows per statement: 3,500 parameters, within SQLite's and MySQL's limits
_DRIVERS = ("aiosqlite", "aiomysql")  # driver connections whose API this speaks

Row = tuple[Any, ...]


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

    async def insert(self, conn: AsyncConnection, rows: Sequence[Row]
                     ) -> list[tuple[int, str | None]]:
        """Insert ``rows`` (values in :data:`COLUMNS` order) in ``conn``'s transaction."""
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        if driver is None:  # pragma: no cover - an invalidated connection fails before this
            raise sa.exc.InvalidRequestError("the connection has no driver connection")
        out: list[tuple[int, str | None]] = []
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
            params = flat if order is None else [flat[k] for k in order]
            try:
                if self._dialect.driver == "aiosqlite":
                    got = await driver.execute_fetchall(sql, params)
                else:
                    async with driver.cursor(self._cursor_class) as cursor:
                        await cursor.execute(sql, params)
                        got = await cursor.fetchall()
            except self._dbapi_error as exc:
                error: Any = exc  # the DBAPI's own Error, as is_disconnect expects
                gone = self._dialect.is_disconnect(error, None, None)
                if gone:  # as SQLAlchemy does: the pool must not hand this connection out
                    await conn.invalidate(exc)
                raise sa.exc.DBAPIError.instance(
                    sql, params, exc, self._dbapi_error, dialect=self._dialect,
                    connection_invalidated=gone,
                ) from exc
            out.extend((int(row_id), key) for row_id, key in got)
        return out
