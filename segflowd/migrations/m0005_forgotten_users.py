"""Version 5: ``forgotten``, the tombstones of recently forgotten users.

Ingest refuses events and identifies for a user id forgotten within ``[retention]
forget_window`` (see :func:`segflowd.ingest.users.forget_user`). A store upgraded from
version 4 starts with no tombstones: users forgotten before the upgrade are not covered.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection

from ..schema import MARIADB_COLLATION, MYSQL_COLLATION


def _forgotten(collation: str) -> sa.Table:
    """``forgotten`` as of version 5."""
    return sa.Table(
        "forgotten", sa.MetaData(),
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("forgotten_at",
                  sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
                  nullable=False),
        mysql_engine="InnoDB", mysql_charset="utf8mb4", mysql_collate=collation,
    )


def upgrade(conn: Connection) -> None:
    mariadb = getattr(conn.dialect, "is_mariadb", False)
    # MariaDB commits a CREATE at once: a step killed after it runs again from here.
    _forgotten(MARIADB_COLLATION if mariadb else MYSQL_COLLATION).create(conn, checkfirst=True)
