"""Version 6: ``engagement.hits``, ``engagement.machine`` and ``engagement.last_at``.

Tracking keeps one row per message, kind, link and machine flag and counts the hits on
it, rather than a row per hit (see :mod:`segflowd.delivery.tracking`). Rows stored
before the upgrade stay as they are, one hit each, made by a person (``machine`` false,
``last_at`` NULL): a later hit on the same link adds to the first of them.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# column: the statement adding it on SQLite, and on MariaDB/MySQL
_ADD = {
    "hits": (sa.text("ALTER TABLE engagement ADD COLUMN hits INTEGER NOT NULL DEFAULT 1"),
             sa.text("ALTER TABLE engagement ADD COLUMN hits INTEGER NOT NULL DEFAULT 1")),
    "machine": (sa.text("ALTER TABLE engagement ADD COLUMN machine BOOLEAN NOT NULL DEFAULT 0"),
                sa.text("ALTER TABLE engagement ADD COLUMN machine BOOL NOT NULL DEFAULT 0")),
    "last_at": (sa.text("ALTER TABLE engagement ADD COLUMN last_at DATETIME NULL"),
                sa.text("ALTER TABLE engagement ADD COLUMN last_at DATETIME(6) NULL")),
}


def upgrade(conn: Connection) -> None:
    # MariaDB commits an ALTER at once: a step killed after one runs again from here
    columns = {c["name"] for c in sa.inspect(conn).get_columns("engagement")}
    for name, (portable, mysql) in _ADD.items():
        if name not in columns:
            conn.execute(portable if conn.dialect.name == "sqlite" else mysql)
