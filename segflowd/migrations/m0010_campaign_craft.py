"""Version 10: experiments, goals and topics.

``messages`` gains ``step`` (a campaign message's place in its flow), ``variant`` (the
instance's latest ``rt.split()`` when it was queued) and ``topic`` (its campaign's or
broadcast's), and an index on (campaign, created_at) for reports and goal attribution;
``broadcasts`` gains ``topic``.
Two tables are new: ``flow_splits`` (each user's variant in an experiment, once) and
``conversions`` (goal events attributed to a campaign's message). Messages stored before
have no step, variant or topic.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection

from ..schema import MARIADB_COLLATION, MYSQL_COLLATION


def _tables(collation: str) -> list[sa.Table]:
    """``flow_splits`` and ``conversions`` as of version 10."""
    time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    kw: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4",
                          "mysql_collate": collation}
    md = sa.MetaData()
    return [
        sa.Table(
            "flow_splits", md,
            sa.Column("campaign", sa.String(191), primary_key=True),
            sa.Column("user_id", sa.String(191), primary_key=True),
            sa.Column("name", sa.String(191), primary_key=True),
            sa.Column("variant", sa.String(64), nullable=False),
            sa.Column("created_at", time, nullable=False),
            sa.Index("ix_flow_splits_user", "user_id"), **kw),
        sa.Table(
            "conversions", md,
            sa.Column("id", big, primary_key=True, autoincrement=True),
            sa.Column("campaign", sa.String(191), nullable=False),
            sa.Column("message_id", sa.BigInteger, nullable=False),
            sa.Column("user_id", sa.String(191), nullable=True),
            sa.Column("template", sa.String(191), nullable=True),
            sa.Column("variant", sa.String(64), nullable=True),
            sa.Column("event_id", sa.BigInteger, nullable=False),
            sa.Column("event_name", sa.String(191), nullable=False),
            sa.Column("converted_at", time, nullable=False),
            sa.UniqueConstraint("message_id", name="uq_conversions_message"),
            sa.Index("ix_conversions_campaign", "campaign", "converted_at"),
            sa.Index("ix_conversions_user", "user_id"), **kw),
    ]


def upgrade(conn: Connection) -> None:
    # MariaDB commits each ALTER and CREATE at once: a step killed after one runs again
    # from here, so each is skipped when already done.
    columns = {c["name"] for c in sa.inspect(conn).get_columns("messages")}
    added = (("step", "INTEGER"), ("variant", "VARCHAR(64)"), ("topic", "VARCHAR(191)"))
    for column, kind in added:
        if column not in columns:
            conn.execute(sa.text(f"ALTER TABLE messages ADD COLUMN {column} {kind} NULL"))
    if "topic" not in {c["name"] for c in sa.inspect(conn).get_columns("broadcasts")}:
        conn.execute(sa.text("ALTER TABLE broadcasts ADD COLUMN topic VARCHAR(191) NULL"))
    indexes = {i["name"] for i in sa.inspect(conn).get_indexes("messages")}
    if "ix_messages_campaign" not in indexes:
        conn.execute(sa.text(
            "CREATE INDEX ix_messages_campaign ON messages (campaign, created_at)"))
    mariadb = getattr(conn.dialect, "is_mariadb", False)
    for table in _tables(MARIADB_COLLATION if mariadb else MYSQL_COLLATION):
        table.create(conn, checkfirst=True)
