"""Shared fixtures: stores on SQLite and real MariaDB, each test on a fresh database.

Servers: MariaDB at ``$SEGFLOW_TEST_MARIADB`` (default root@127.0.0.1:3306) and
PostgreSQL at ``$SEGFLOW_TEST_POSTGRES`` (default postgres@127.0.0.1:5432). Without
them the tests that need them skip with the reason; under ``CI=true`` they fail instead,
because CI must run them.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import sqlalchemy as sa
import structlog

from segflowd.store import Store

MARIADB = os.environ.get("SEGFLOW_TEST_MARIADB", "mysql+aiomysql://root@127.0.0.1:3306")
POSTGRES = os.environ.get("SEGFLOW_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _reachable(url: str) -> bool:
    u = sa.engine.make_url(url)
    try:
        with socket.create_connection((u.host or "127.0.0.1", u.port or 3306), timeout=1):
            return True
    except OSError:
        return False


def require_server(name: str, url: str) -> None:
    """Skip (or, under CI, fail) when the server behind ``url`` is not reachable."""
    if _reachable(url):
        return
    message = f"{name} is not reachable at {sa.engine.make_url(url).render_as_string()}"
    if IN_CI:
        pytest.fail(f"{message}, and CI=true requires it")
    pytest.skip(message)


def _mariadb_admin() -> sa.engine.Engine:
    u = sa.engine.make_url(MARIADB).set(drivername="mysql+pymysql", database=None)
    return sa.create_engine(u, poolclass=sa.pool.NullPool)


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A fresh, empty MariaDB database for this test, dropped afterwards."""
    require_server("MariaDB", MARIADB)
    name = f"segflow_t_{uuid.uuid4().hex[:12]}"
    admin = _mariadb_admin()
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield str(sa.engine.make_url(MARIADB).set(database=name).render_as_string(
            hide_password=False))
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/segflow.db"


@pytest.fixture(params=["sqlite", "mariadb"])
def store_url(request: pytest.FixtureRequest) -> str:
    """A fresh store URL, once on SQLite and once on MariaDB."""
    fixture = "sqlite_url" if request.param == "sqlite" else "mariadb_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """A migrated, empty store on each dialect."""
    s = Store.open(store_url)
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test (a customer's database)."""
    require_server("PostgreSQL", POSTGRES)
    name = f"segflow_t_{uuid.uuid4().hex[:12]}"
    u = sa.engine.make_url(POSTGRES).set(drivername="postgresql+psycopg2", database="postgres")
    try:
        admin = sa.create_engine(u, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    except ModuleNotFoundError:  # pragma: no cover - psycopg2 comes with the test extra
        pytest.fail("psycopg2 is not installed: pip install -e '.[test]'")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield str(sa.engine.make_url(POSTGRES).set(database=name).render_as_string(
            hide_password=False))
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect after each test, so a leaked socket's ResourceWarning names its own test."""
    yield
    gc.collect()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the process's logging back after a test that configures it (``cli.main`` and
    ``configure_logging`` do): the root handlers and level, and structlog's config."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)
