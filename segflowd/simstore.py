"""The simulation's SQLite store, its statements run on the event loop's own thread.

aiosqlite runs each connection's statements in a thread of its own: right for the daemon,
which must never block its event loop on a disk, but each statement then pays two thread
hand-offs, and a simulation is nothing but statements on a small database in a temporary
folder. :func:`run_inline` makes the store's connections :class:`InlineConnection`\\ s,
which run each statement at once, in the caller's thread; the SQL, the transactions and
the engines are unchanged.

Two connections still cannot both write: SQLite's own wait for the lock (busy_timeout)
would now stop the event loop, and with it the task holding the lock. So the wait is
made here instead: busy_timeout is 0, and a statement refused with "database is locked"
yields to the event loop and is tried again.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sqlite3
from collections.abc import Callable, Generator
from typing import Any

import aiosqlite
import anyio
import sqlalchemy as sa

from .store import Store

__all__ = ["InlineConnection", "inline_supported", "run_inline"]

ITER_CHUNK = 64  # rows aiosqlite fetches per step when a cursor is iterated
LOCK_YIELDS = 1000  # tries that only yield to the event loop before sleeping between tries
LOCK_SLEEP = 0.001  # seconds between later tries
LOCK_TRIES = 20_000  # tries before the lock error is raised (about 20 s)


class _RunNow:
    """Stands in for the queue to aiosqlite's thread: runs each call at once (SQLAlchemy's
    adapter puts calls there itself, to set the isolation level)."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except Exception as exc:
            if future is not None:
                future.set_exception(exc)
        else:
            if future is not None:
                future.set_result(result)


class InlineConnection(aiosqlite.Connection):
    """An aiosqlite connection without its thread; see the module docstring."""

    def __init__(self, connector: Callable[[], sqlite3.Connection], iter_chunk_size: int
                 ) -> None:
        super().__init__(connector, iter_chunk_size)
        self._tx = _RunNow()  # type: ignore[assignment]  # put_nowait is all it is asked

    def __await__(self) -> Generator[Any, None, InlineConnection]:
        return self._connect().__await__()

    async def _connect(self) -> InlineConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or self._connection is None:
            raise ValueError("Connection closed")
        if args and isinstance(args[0], str) and args[0].upper().startswith(
                "PRAGMA BUSY_TIMEOUT"):
            args = ("PRAGMA busy_timeout=0", *args[1:])  # the wait is ours, below
        tries = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                tries += 1
                if "locked" not in str(exc) or tries >= LOCK_TRIES:
                    raise
            # the writer holding the lock is another task of this event loop: let it run
            await anyio.sleep(0 if tries < LOCK_YIELDS else LOCK_SLEEP)

    def stop(self) -> None:  # nothing to wait for: there is no thread
        self._running = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        self.stop()


def _connect(*args: Any, **kwargs: Any) -> InlineConnection:
    return InlineConnection(functools.partial(sqlite3.connect, *args, **kwargs), ITER_CHUNK)


def inline_supported() -> bool:
    """Whether the installed aiosqlite has the internals :class:`InlineConnection` replaces
    (checked on 0.20 to 0.22); with another, the simulation runs on plain aiosqlite,
    slower but the same."""
    try:
        params = list(inspect.signature(aiosqlite.Connection.__init__).parameters)
    except (TypeError, ValueError):
        return False
    return (params[1:3] == ["connector", "iter_chunk_size"]
            and all(callable(getattr(aiosqlite.Connection, name, None))
                    for name in ("_execute", "_connect", "stop", "close")))


def run_inline(store: Store) -> bool:
    """Make every connection ``store`` opens from now on an :class:`InlineConnection`;
    False (nothing changed) where the installed aiosqlite is not one it knows."""
    if store.dialect != "sqlite":
        raise ValueError("only an SQLite store runs inline")
    if not inline_supported():
        return False

    @sa.event.listens_for(store.engine.sync_engine, "do_connect")
    def _inline(dialect: object, record: object, cargs: object,
                cparams: dict[str, object]) -> None:
        cparams["async_creator_fn"] = _connect
    return True
