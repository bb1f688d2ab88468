"""Version 3: ``flow_instances.wait_after``, the event high-water mark of a wait.

A ``wait_for_event`` is woken only by an event stored after the wait began: one whose id
is above ``wait_after``. Recording it lets flows match waits against the store (at start,
after an outage, on resume of a paused campaign), not only against the in-memory hand-off
from ingest. Waits already pending when the store is upgraded get the highest event id
stored now: nothing older wakes them, as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

_meta = sa.MetaData()
# The columns as of version 3, only as far as this step needs them.
_flow_instances = sa.Table(
    "flow_instances", _meta,
    sa.Column("status", sa.String(16)),
    sa.Column("wait_event", sa.String(191)),
    sa.Column("wait_after", sa.BigInteger),
)
_events = sa.Table("events", _meta, sa.Column("id", sa.BigInteger))


def upgrade(conn: Connection) -> None:
    # MariaDB commits an ALTER at once: a step killed after it runs again from here
    columns = {c["name"] for c in sa.inspect(conn).get_columns("flow_instances")}
    if "wait_after" not in columns:
        conn.execute(sa.text("ALTER TABLE flow_instances ADD COLUMN wait_after BIGINT NULL"))
    top = conn.execute(sa.select(sa.func.max(_events.c.id))).scalar() or 0
    c = _flow_instances.c
    conn.execute(sa.update(_flow_instances).where(
        c.status == "waiting", c.wait_event.is_not(None)).values(wait_after=int(top)))
