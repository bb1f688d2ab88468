"""Version 8: ``devices``, the push device tokens of users.

Customer.io's ``PUT /api/v1/customers/{id}/devices`` and Track API v2's ``add_device``
store a token with its platform and last-used time (see :mod:`segflowd.ingest.devices`).
A store upgraded from version 7 starts with none.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection

from ..jsonvalues import PortableJSON
from ..schema import MARIADB_COLLATION, MYSQL_COLLATION


def _devices(collation: str) -> sa.Table:
    """``devices`` as of version 8."""
    time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    return sa.Table(
        "devices", sa.MetaData(),
        sa.Column("token", sa.String(255), primary_key=True),
        sa.Column("user_id", sa.String(191), nullable=False),
        sa.Column("platform", sa.String(16), nullable=False),
        sa.Column("last_used", time, nullable=True),
        sa.Column("attributes", PortableJSON().with_variant(mysql.JSON(), "mysql", "mariadb"),
                  nullable=False),
        sa.Column("created_at", time, nullable=False),
        sa.Column("updated_at", time, nullable=False),
        sa.Index("ix_devices_user", "user_id"),
        mysql_engine="InnoDB", mysql_charset="utf8mb4", mysql_collate=collation,
    )


def upgrade(conn: Connection) -> None:
    mariadb = getattr(conn.dialect, "is_mariadb", False)
    # MariaDB commits a CREATE at once: a step killed after it runs again from here.
    _devices(MARIADB_COLLATION if mariadb else MYSQL_COLLATION).create(conn, checkfirst=True)
