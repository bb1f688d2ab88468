"""Version 11: ``message_events``, what became of a message, for reports.

One row per message and kind: ``delivered``, ``bounced`` and ``complained`` from the
providers' webhooks (Postmark, SES), ``unsubscribed`` from the message's unsubscribe link
(see :mod:`segflowd.delivery.msgevents`), ``opened`` and ``clicked`` copied from a
person's ``engagement`` rows when a report runs (:mod:`segflowd.reports`). Each row
carries its message's report key (campaign, step, template, variant, ``sent_on``), so a
report counts them without a join; nothing about the person. A store upgraded from
version 10 starts with none: its older messages show no webhook outcomes, and their
opens and clicks are copied by the first report.

``messages`` gains two indexes: on ``provider_message_id`` (a webhook finds its message
by it) and a covering one for reports (campaign, created_at, step, template, variant,
status).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection

from ..schema import MARIADB_COLLATION, MYSQL_COLLATION

_INDEXES = (
    ("ix_messages_provider_id", "provider_message_id"),
    ("ix_messages_report", "campaign, created_at, step, template, variant, status"),
)


def _message_events(collation: str) -> sa.Table:
    """``message_events`` as of version 11."""
    time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    return sa.Table(
        "message_events", sa.MetaData(),
        sa.Column("message_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("created_at", time, nullable=False),
        sa.Column("campaign", sa.String(191), nullable=True),
        sa.Column("step", sa.Integer, nullable=True),
        sa.Column("template", sa.String(191), nullable=True),
        sa.Column("variant", sa.String(64), nullable=True),
        sa.Column("sent_on", time, nullable=True),
        sa.Index("ix_message_events_report", "campaign", "sent_on", "step", "template",
                 "variant", "kind"),
        mysql_engine="InnoDB", mysql_charset="utf8mb4", mysql_collate=collation,
    )


def upgrade(conn: Connection) -> None:
    # MariaDB commits each CREATE at once: a step killed after one runs again from here,
    # so each is skipped when already done.
    indexes = {i["name"] for i in sa.inspect(conn).get_indexes("messages")}
    for name, columns in _INDEXES:
        if name not in indexes:
            conn.execute(sa.text(f"CREATE INDEX {name} ON messages ({columns})"))
    mariadb = getattr(conn.dialect, "is_mariadb", False)
    _message_events(MARIADB_COLLATION if mariadb else MYSQL_COLLATION).create(
        conn, checkfirst=True)
