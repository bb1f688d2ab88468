"""Bounds on every wait for a MySQL/MariaDB server (see :meth:`segflowd.store.Store.open`).

A server that stops answering with its connections open (SIGSTOP, a hung disk, a VM
paused) leaves the kernel accepting and acknowledging: without a bound of its own, a
client waits forever. Here each connect has one, and each read of a connection made
for an HTTP request (:data:`REQUEST_BOUND`, set where the daemon serves HTTP, and so
inherited by every request handler) has one: ``[store] timeout``. Background work (a
segment refresh over millions of events, a prune, a migration) is not cut by it: a
query that computes for a minute before its first row is not a frozen server. The group
commit bounds itself as a whole (:mod:`segflowd.ingest.committer`).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["CR_SERVER_LOST", "REQUEST_BOUND", "bounded_connect", "read_bound"]

CR_SERVER_LOST = 2013  # the MySQL client error of a connection lost mid-query
# Seconds a read may wait for the server where no connection-level bound is set: the
# daemon sets it to [store] timeout in the context its HTTP server runs in.
REQUEST_BOUND: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "segflow_store_request_bound", default=None)


def bounded_connect(driver: str, connect_timeout: float, timeout: float
                     ) -> Callable[..., None]:
    """A ``do_connect`` listener: connections whose every wait for the server is bounded.

    aiomysql's own ``connect_timeout`` covers the TCP connect alone, and it has no read
    timeout: against a frozen server (SIGSTOP: the kernel still accepts and acknowledges)
    the handshake, a statement or a COMMIT waits forever. Its connections are made of
    :func:`_aiomysql_class` instead; asyncmy has a ``read_timeout`` of its own. The whole
    connect (TCP, handshake, authentication) is bounded as well.
    """
    limit = connect_timeout + timeout
    if driver == "asyncmy":
        # asyncmy's read_timeout is one for the connection's life: not set, so background
        # work is never cut (a request's commit is still bounded by the committer).
        import asyncmy
        from asyncmy.errors import OperationalError

        make: Callable[..., Awaitable[Any]] = asyncmy.connect
        extra: dict[str, object] = {}
        error: type[Exception] = OperationalError
    else:
        make = _aiomysql_class().open
        extra = {}
        error = _pymysql_error()

    async def connect(*args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(limit):
                return await make(*args, **{**kwargs, **extra})
        except TimeoutError:
            raise error(2003, f"Can't connect to MySQL server: no answer within {limit:g} s"
                        ) from None

    def on_do_connect(_dialect: object, _record: object, _cargs: object,
                      cparams: dict[str, object]) -> None:
        cparams["async_creator_fn"] = connect
    return on_do_connect


def _aiomysql_class() -> Any:
    """An aiomysql ``Connection`` whose reads wait its ``read_timeout`` (or, unset, the
    context's :data:`REQUEST_BOUND`) seconds at most.

    One bound per read of the socket (as PyMySQL's ``read_timeout``): a read served from
    what is already buffered arms no timer, so a big result costs nothing more. A read
    that times out closes the connection and raises the driver's "lost connection"
    (2013): SQLAlchemy invalidates it, and the pool never hands it out again (a
    transaction cut short this way is rolled back by the server, never resumed).
    """
    from aiomysql.connection import Connection  # type: ignore[import-untyped]  # reason: untyped
    error = _pymysql_error()

    class BoundedConnection(Connection):  # type: ignore[misc]  # reason: untyped base
        read_timeout: float | None = None  # a bound of its own (None: the context's)

        @classmethod
        async def open(cls, *args: Any, **kwargs: Any) -> BoundedConnection:
            """What ``aiomysql.connect`` does, with this class."""
            conn = cls(*args, **kwargs)
            try:
                await conn._connect()
            except BaseException:  # a connect cut short (the bound) leaves no socket open
                conn.close()
                raise
            return conn

        async def _read_bytes(self, num_bytes: int) -> bytes:
            limit = self.read_timeout if self.read_timeout is not None else REQUEST_BOUND.get()
            buffered = getattr(self._reader, "_buffer", b"")
            if limit is None or len(buffered) >= num_bytes:
                return await super()._read_bytes(num_bytes)  # type: ignore[no-any-return]
            # A timer that closes the socket, rather than a cancellation: the pending
            # read then fails as a lost connection, which aiomysql and SQLAlchemy
            # already handle (and a timer costs half an asyncio.timeout()).
            timer = asyncio.get_running_loop().call_later(limit, self._no_answer)
            try:
                return await super()._read_bytes(num_bytes)  # type: ignore[no-any-return]
            except error as exc:
                if self._timed_out:
                    raise error(CR_SERVER_LOST, "Lost connection to MySQL server: no answer "
                                                f"within {limit:g} s") from exc
                raise
            finally:
                timer.cancel()

        _timed_out = False

        def _no_answer(self) -> None:
            self._timed_out = True
            self.close()

    return BoundedConnection


def _pymysql_error() -> type[Exception]:
    """The OperationalError aiomysql raises (PyMySQL's): SQLAlchemy classifies it."""
    from pymysql import err  # type: ignore[import-untyped]  # reason: no stubs installed

    cls: type[Exception] = err.OperationalError
    return cls


def read_bound(driver: Any, bound: float | None) -> float | None:
    """Set a MySQL driver connection's read bound (None: unbounded); return the old one."""
    attr = "_read_timeout" if hasattr(driver, "_read_timeout") else "read_timeout"
    if not hasattr(driver, attr):  # SQLite: nothing is bounded this way
        return None
    old: float | None = getattr(driver, attr)
    setattr(driver, attr, bound)
    return old
