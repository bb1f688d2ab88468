"""Stores for benchmarks: a fresh SQLite file or a fresh MariaDB database, dropped after."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

MARIADB = os.environ.get("SEGFLOW_BENCH_MARIADB", "mysql+aiomysql://root@127.0.0.1:3306")
KINDS = ("sqlite", "mariadb")


@contextmanager
def store_url(kind: str, folder: Path) -> Iterator[str]:
    """The URL of an empty store of ``kind`` (``sqlite`` in ``folder``, or ``mariadb``)."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{folder / 'store.db'}"
        return
    if kind != "mariadb":
        raise ValueError(f"unknown store kind {kind!r} (use one of {', '.join(KINDS)})")
    name = f"segflow_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(sa.engine.make_url(MARIADB).set(drivername="mysql+pymysql"),
                             poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")  # generated
    try:
        yield f"{MARIADB}/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()
