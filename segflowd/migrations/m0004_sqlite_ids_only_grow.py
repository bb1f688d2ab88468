"""Version 4: on SQLite, ``events`` and ``segment_changes`` become AUTOINCREMENT tables.

Wait marks (``flow_instances.wait_after``), consumer cursors (``engine_cursors``) and
segment-change marks take a higher id to mean a later row. A SQLite ``INTEGER PRIMARY
KEY`` without AUTOINCREMENT issues max(id)+1, so once the newest rows are deleted
(forgetting a user deletes their events and changes) their ids are issued again, below
the marks, and the new rows are never seen. SQLite cannot add AUTOINCREMENT to a table,
so each is rebuilt inside the migration's transaction: renamed aside, created anew with
its indexes, its rows copied with their ids, the old one dropped. ``sqlite_sequence``
then starts above every id the store still names (for events: stored rows, consumer
cursors, wait and entry marks, ``tx:<event id>:...`` message keys; for changes: stored
rows and the flows' changes cursor), so ids of rows deleted before the upgrade are not
issued again either. The copy is a full pass over both tables.

MariaDB and MySQL need nothing: an InnoDB AUTO_INCREMENT counter never goes back, and
since MariaDB 10.2.4 (MySQL 8.0) it survives a restart too. (On older servers a restart
reset it to max(id)+1; those are below the supported versions.)
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

_meta = sa.MetaData()
_Time = sa.DateTime()
_Id = sa.String(191)


def _events(meta: sa.MetaData, name: str) -> sa.Table:
    """``events`` as of version 4, as SQLite stores it (under ``name``)."""
    t = sa.Table(
        name, meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", _Id, nullable=True),
        sa.Column("anonymous_id", _Id, nullable=True),
        sa.Column("name", sa.String(191), nullable=False),
        sa.Column("attributes", sa.JSON, nullable=False),
        sa.Column("dedupe_key", sa.String(255), nullable=True),
        sa.Column("created_at", _Time, nullable=False),
        sa.Column("received_at", _Time, nullable=False),
        sa.UniqueConstraint("dedupe_key", name="uq_events_dedupe"),
        sqlite_autoincrement=True,
    )
    sa.Index("ix_events_user_name_time", t.c.user_id, t.c.name, t.c.created_at)
    sa.Index("ix_events_name_time", t.c.name, t.c.created_at)
    sa.Index("ix_events_anon", t.c.anonymous_id)
    return t


def _segment_changes(meta: sa.MetaData, name: str) -> sa.Table:
    """``segment_changes`` as of version 4, as SQLite stores it (under ``name``)."""
    t = sa.Table(
        name, meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("segment", sa.String(191), nullable=False),
        sa.Column("user_id", _Id, nullable=False),
        sa.Column("entered", sa.Boolean, nullable=False),
        sa.Column("at", _Time, nullable=False),
        sqlite_autoincrement=True,
    )
    sa.Index("ix_segment_changes_user", t.c.user_id, t.c.id)
    sa.Index("ix_segment_changes_segment", t.c.segment, t.c.id)
    return t


# table: how version 4 makes it, where version 3's goes aside, the statement moving it
_REBUILT = {
    "events": (_events, "events_v3", sa.text("ALTER TABLE events RENAME TO events_v3")),
    "segment_changes": (_segment_changes, "segment_changes_v3",
                        sa.text("ALTER TABLE segment_changes RENAME TO segment_changes_v3")),
}

# What still names ids, beside the rows themselves, as of version 4.
_engine_cursors = sa.Table(
    "engine_cursors", _meta,
    sa.Column("name", sa.String(191)), sa.Column("last_event_id", sa.BigInteger))
_CHANGES_CURSOR = "flows.changes"  # the one cursor whose "last_event_id" is a change id
_flow_instances = sa.Table(
    "flow_instances", _meta,
    sa.Column("wait_after", sa.BigInteger), sa.Column("entry_event_id", sa.BigInteger))
_messages = sa.Table("messages", _meta, sa.Column("dedupe_key", sa.String(255)))
_sqlite_sequence = sa.Table(
    "sqlite_sequence", _meta, sa.Column("name", sa.Text), sa.Column("seq", sa.Integer))


def upgrade(conn: Connection) -> None:
    if conn.dialect.name != "sqlite":
        return
    meta = sa.MetaData()
    for name, (define, aside, rename_aside) in _REBUILT.items():
        old, new = define(meta, aside), define(meta, name)
        conn.execute(rename_aside)
        for index in old.indexes:  # their names moved aside with the table: free them
            index.drop(conn, checkfirst=True)
        new.create(conn)
        columns = [c.name for c in new.c]
        conn.execute(sa.insert(new).from_select(columns, sa.select(*(old.c[c] for c in columns))))
        old.drop(conn)
    ec = _engine_cursors.c
    key = _messages.c.dedupe_key
    # "tx:<event id>:<transaction>": the digits between the first two colons
    rest = sa.func.substr(key, 4)
    tx_event = sa.cast(sa.func.substr(rest, 1, sa.func.instr(rest, ":") - 1), sa.Integer)
    _keep_above(conn, "events", _highest(
        conn, sa.select(sa.func.max(meta.tables["events"].c.id)),
        sa.select(sa.func.max(ec.last_event_id)).where(ec.name != _CHANGES_CURSOR),
        sa.select(sa.func.max(_flow_instances.c.wait_after)),
        sa.select(sa.func.max(_flow_instances.c.entry_event_id)),
        sa.select(sa.func.max(tx_event)).where(key.startswith("tx:"))))
    _keep_above(conn, "segment_changes", _highest(
        conn, sa.select(sa.func.max(meta.tables["segment_changes"].c.id)),
        sa.select(sa.func.max(ec.last_event_id)).where(ec.name == _CHANGES_CURSOR)))


def _highest(conn: Connection, *queries: sa.Select[Any]) -> int:
    """The highest of the queries' single values (0 for none)."""
    return max(int(conn.execute(q).scalar() or 0) for q in queries)


def _keep_above(conn: Connection, table: str, floor: int) -> None:
    """Make ``table``'s next AUTOINCREMENT id at least ``floor + 1``."""
    seq = _sqlite_sequence.c
    done = conn.execute(sa.update(_sqlite_sequence).where(seq.name == table, seq.seq < floor)
                        .values(seq=floor))
    if done.rowcount == 0 and conn.execute(
            sa.select(seq.seq).where(seq.name == table)).first() is None:
        conn.execute(sa.insert(_sqlite_sequence).values(name=table, seq=floor))
