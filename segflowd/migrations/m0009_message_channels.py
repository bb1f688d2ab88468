"""Version 9: ``messages.channel`` and ``messages.response``: SMS and webhooks in the outbox.

A message is sent on a channel: ``email`` (every row from before), ``sms`` or
``webhook``. A webhook's answer (status, headers, JSON body), which the flow that called
it reads when it resumes, is kept in ``response``; an SMS keeps its provider's delivery
report there; email leaves it NULL.

Users' ``phone`` attributes stored before are normalised to E.164 as ingest now keeps
them (:func:`segflowd.ingest.users.with_phone`), so an inbound STOP, which carries the
number in E.164, finds them; an invalid number is left as written.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..phones import PHONE_ATTRIBUTE, phone_of

CHUNK = 1000  # users read per statement while normalising phones


def upgrade(conn: Connection) -> None:
    # MariaDB commits an ALTER at once: a step killed after one runs again from here
    columns = {c["name"] for c in sa.inspect(conn).get_columns("messages")}
    if "channel" not in columns:
        conn.execute(sa.text(
            "ALTER TABLE messages ADD COLUMN channel VARCHAR(16) NOT NULL DEFAULT 'email'"))
    if "response" not in columns:
        kind = "JSON" if conn.dialect.name in ("mysql", "mariadb") else "TEXT"
        conn.execute(sa.text(f"ALTER TABLE messages ADD COLUMN response {kind} NULL"))
    _normalise_phones(conn)


def _normalise_phones(conn: Connection) -> None:
    """Rewrite valid ``phone`` attributes in E.164 (idempotent: a rerun changes nothing)."""
    users = sa.table("users", sa.column("id", sa.String), sa.column("attributes", sa.Text))
    after = ""
    while True:
        rows = conn.execute(
            sa.select(users.c.id, users.c.attributes)
            .where(users.c.id > after, users.c.attributes.like('%"phone"%'))
            .order_by(users.c.id).limit(CHUNK)).all()
        if not rows:
            return
        for uid, raw in rows:
            attrs = json.loads(raw) if isinstance(raw, str | bytes) else raw
            if not isinstance(attrs, dict):
                continue
            phone = phone_of(attrs)
            if phone is not None and phone != attrs.get(PHONE_ATTRIBUTE):
                conn.execute(sa.update(users).where(users.c.id == uid).values(
                    attributes=json.dumps({**attrs, PHONE_ATTRIBUTE: phone})))
        after = str(rows[-1][0])
