"""The store's tables, as SQLAlchemy Core.

``users`` and ``events`` are public: segment queries select from them. The rest belong
to the daemon. Times are naive UTC with microseconds. Every hot query has an index:
the comment beside each names the query it serves.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from .jsonvalues import PortableJSON

__all__ = [
    "SCHEMA_VERSION",
    "anonymous_links",
    "audience_members",
    "broadcasts",
    "campaign_settings",
    "campaign_versions",
    "conversions",
    "devices",
    "engagement",
    "engine_cursors",
    "events",
    "flow_instances",
    "flow_journal",
    "flow_splits",
    "forgotten",
    "message_events",
    "messages",
    "metadata",
    "schema_version",
    "segment_changes",
    "segment_members",
    "segment_state",
    "subscriptions",
    "suppressions",
    "users",
]

# The version a fresh store is created at; migrations/ holds the steps to reach it.
SCHEMA_VERSION = 11

metadata = sa.MetaData()

# Portable column types: MySQL gets microsecond DATETIME and utf8mb4 strings that fit
# its index limits; SQLite takes them as they are.
Time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Id = sa.String(191)  # 191 * 4 bytes fits InnoDB's 767-byte index prefix limit
Name = sa.String(191)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrement wants INTEGER
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
# Its as_boolean() / as_integer() / as_float() / as_string() mean the same on both stores.
Json = PortableJSON().with_variant(mysql.JSON(), "mysql", "mariadb")

# Binary collation: ids and names compare byte for byte. utf8mb4_bin is PAD SPACE
# ("ann " = "ann"), so a MariaDB server gets its no-pad variant at create time (see
# _collation below). MySQL keeps utf8mb4_bin: its NO PAD utf8mb4_0900_bin needs 8.0.
MYSQL_COLLATION = "utf8mb4_bin"
MARIADB_COLLATION = "utf8mb4_nopad_bin"
_mysql: dict[str, Any] = {
    "mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": MYSQL_COLLATION,
}

schema_version = sa.Table(
    "segflow_schema",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("migrated_at", Time, nullable=False),
    sa.Column("migrated_by", sa.String(64), nullable=False),
    **_mysql,
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("email", sa.String(320), nullable=True),
    sa.Column("attributes", Json, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Index("ix_users_email", "email"),  # suppression / unsubscribe look-ups by address
    sa.Index("ix_users_updated", "updated_at"),
    **_mysql,
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("user_id", Id, nullable=True),  # NULL while only anonymous_id is known
    sa.Column("anonymous_id", Id, nullable=True),
    sa.Column("name", Name, nullable=False),
    sa.Column("attributes", Json, nullable=False),
    sa.Column("dedupe_key", sa.String(255), nullable=True),  # client event id / messageId
    sa.Column("created_at", Time, nullable=False),  # event time: the client's, or received
    sa.Column("received_at", Time, nullable=False),
    sa.UniqueConstraint("dedupe_key", name="uq_events_dedupe"),  # NULLs do not collide
    sa.Index("ix_events_user_name_time", "user_id", "name", "created_at"),  # segments per user
    sa.Index("ix_events_name_time", "name", "created_at"),  # segments over all users
    sa.Index("ix_events_anon", "anonymous_id"),  # joining anonymous events on identify
    # Ids only grow, even past deleted rows (a forgotten user's): wait marks and consumer
    # cursors take a higher id for a later event. SQLite reuses max+1 without this.
    sqlite_autoincrement=True,
    **_mysql,
)

segment_members = sa.Table(
    "segment_members",
    metadata,
    sa.Column("segment", Name, primary_key=True),
    sa.Column("user_id", Id, primary_key=True),
    sa.Column("entered_at", Time, nullable=False),
    # Evaluation time of the result that put this row here: an older result never
    # overwrites a newer one (incremental vs scheduled evaluation).
    sa.Column("evaluated_at", Time, nullable=False),
    sa.Index("ix_segment_members_user", "user_id"),  # a user's segments
    **_mysql,
)

segment_changes = sa.Table(
    "segment_changes",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("segment", Name, nullable=False),
    sa.Column("user_id", Id, nullable=False),
    sa.Column("entered", sa.Boolean, nullable=False),  # True: entry, False: exit
    sa.Column("at", Time, nullable=False),
    sa.Index("ix_segment_changes_user", "user_id", "id"),
    sa.Index("ix_segment_changes_segment", "segment", "id"),
    sqlite_autoincrement=True,  # as events: marks of "changes after this one" compare ids
    **_mysql,
)

segment_state = sa.Table(
    "segment_state",
    metadata,
    sa.Column("segment", Name, primary_key=True),
    sa.Column("last_refresh_at", Time, nullable=True),
    sa.Column("next_refresh_at", Time, nullable=True),
    sa.Column("size", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text, nullable=True),
    **_mysql,
)

campaign_versions = sa.Table(
    "campaign_versions",
    metadata,
    sa.Column("campaign", Name, primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("source", LongText, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    **_mysql,
)

# -- flows ------------------------------------------------------------------------------
campaign_settings = sa.Table(
    "campaign_settings",
    metadata,
    # Operator switches that outlive a restart: a paused campaign takes no new entries
    # and runs no steps; its waits stay in the store and fire after it resumes.
    sa.Column("campaign", Name, primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("updated_at", Time, nullable=False),
    **_mysql,
)

flow_instances = sa.Table(
    "flow_instances",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("campaign", Name, nullable=False),
    sa.Column("user_id", Id, nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    # running | waiting | completed | exited | failed | diverged | terminated
    sa.Column("status", sa.String(16), nullable=False),
    # 1 while the instance is live, NULL once it ended: UNIQUE(campaign, user_id, live)
    # lets the store, not only the code, enforce one live instance per (campaign, user).
    sa.Column("live", sa.SmallInteger, nullable=True),
    sa.Column("seq", sa.Integer, nullable=False, server_default="0"),  # journal length
    sa.Column("wake_at", Time, nullable=True),  # set while waiting on a timer
    sa.Column("wait_event", Name, nullable=True),  # set while waiting for an event
    # ... and only an event stored after the wait began wakes it: id above this one
    sa.Column("wait_after", sa.BigInteger, nullable=True),
    sa.Column("entry_event_id", sa.BigInteger, nullable=True),
    # flows: started by start_flow() (a broadcast) rather than an entry; the key makes a
    # retried start a no-op, the data is ``ctx.data``
    sa.Column("start_key", sa.String(255), nullable=True),
    sa.Column("start_data", Json, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("ended_at", Time, nullable=True),
    sa.UniqueConstraint("campaign", "user_id", "live", name="uq_flow_instances_live"),
    sa.UniqueConstraint("start_key", name="uq_flow_instances_start_key"),  # NULLs never collide
    sa.Index("ix_flow_instances_wake", "wake_at"),  # the timer loader: due waits by time
    sa.Index("ix_flow_instances_user", "user_id", "wait_event"),  # wait_for_event matching
    sa.Index("ix_flow_instances_campaign_status", "campaign", "status"),  # funnels
    # the versions live instances run: a start finds old ones by seeks, not by a scan
    sa.Index("ix_flow_instances_live_version", "campaign", "live", "version"),
    **_mysql,
)

flow_journal = sa.Table(
    "flow_journal",
    metadata,
    sa.Column("instance_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("name", Name, nullable=True),
    sa.Column("args_hash", sa.String(64), nullable=False),
    sa.Column("result", Json, nullable=True),
    sa.Column("reads", Json, nullable=True),  # what the flow read of ctx before this yield
    sa.Column("created_at", Time, nullable=False),
    **_mysql,
)

flow_splits = sa.Table(
    "flow_splits",
    metadata,
    # rt.split(name, weights): the variant a user was given in a campaign's experiment
    # ``name``, once; new weights change only users not yet assigned (version 10).
    sa.Column("campaign", Name, primary_key=True),
    sa.Column("user_id", Id, primary_key=True),
    sa.Column("name", Name, primary_key=True),
    sa.Column("variant", sa.String(64), nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Index("ix_flow_splits_user", "user_id"),  # forgetting a user
    **_mysql,
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("user_id", Id, nullable=True),  # NULL once the user is forgotten
    sa.Column("kind", sa.String(16), nullable=False),  # campaign | transaction | test | broadcast
    # email | sms | webhook (segflowd.delivery.channels); version 9
    sa.Column("channel", sa.String(16), nullable=False, server_default="email"),
    sa.Column("campaign", Name, nullable=True),
    sa.Column("transaction", Name, nullable=True),
    sa.Column("instance_id", sa.BigInteger, nullable=True),
    sa.Column("template", Name, nullable=False),
    sa.Column("to_address", sa.String(320), nullable=True),
    sa.Column("data", Json, nullable=True),  # template context beyond the user
    # queued | claimed | sending | sent | failed | suppressed | unknown
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("provider", Name, nullable=True),
    # The claim that made it `sending` (a token per claimed batch): an outcome is
    # recorded only under the claim it belongs to, never over a later one.
    sa.Column("claim", sa.String(32), nullable=True),
    sa.Column("provider_message_id", sa.String(255), nullable=True),
    sa.Column("message_id", sa.String(255), nullable=True),  # RFC 5322 Message-ID
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", Time, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    # "tx:<event id>:<transaction>", "flow:<instance>:<seq>": a send is enqueued once
    sa.Column("dedupe_key", sa.String(255), nullable=True),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("sent_at", Time, nullable=True),
    # A webhook's answer for the flow that called it: {"status", "headers", "json", ...}
    sa.Column("response", Json, nullable=True),
    # version 10: a campaign message's step (its instance's seq), the variant of the
    # instance's latest rt.split() when it was queued, and the campaign's topic
    sa.Column("step", sa.Integer, nullable=True),
    sa.Column("variant", sa.String(64), nullable=True),
    sa.Column("topic", Name, nullable=True),
    sa.UniqueConstraint("dedupe_key", name="uq_messages_dedupe"),
    sa.Index("ix_messages_status_next", "status", "next_attempt_at"),  # delivery workers
    sa.Index("ix_messages_user", "user_id", "template"),  # opened()/clicked(), user view
    sa.Index("ix_messages_created", "created_at"),  # recent messages
    # reports and goal attribution: a campaign's messages by time (version 10)
    sa.Index("ix_messages_campaign", "campaign", "created_at"),
    # provider webhooks find their message by the provider's id of it (version 11)
    sa.Index("ix_messages_provider_id", "provider_message_id"),
    # reports: a campaign's messages by time, counted from the index alone (version 11)
    sa.Index("ix_messages_report", "campaign", "created_at", "step", "template", "variant",
             "status"),
    **_mysql,
)

# One row per message, kind, link and machine flag: its first hit (created_at), its last
# (last_at, NULL before version 6) and how many (hits). A row stored before version 6
# is one hit. machine: a prefetch or link scanner recognised by its user agent.
engagement = sa.Table(
    "engagement",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.BigInteger, nullable=False),
    sa.Column("user_id", Id, nullable=True),
    sa.Column("kind", sa.String(16), nullable=False),  # open | click
    sa.Column("url", sa.Text, nullable=True),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("hits", sa.Integer, nullable=False, server_default="1"),
    sa.Column("machine", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("last_at", Time, nullable=True),
    sa.Index("ix_engagement_message", "message_id", "kind"),
    sa.Index("ix_engagement_user", "user_id", "kind"),
    **_mysql,
)

message_events = sa.Table(
    "message_events",
    metadata,
    # What became of a message, once per kind: delivered | bounced | complained (provider
    # webhooks), unsubscribed (its link), opened | clicked (by a person: copied from
    # engagement when a report runs). Version 11. The message's report key (campaign,
    # step, template, variant, created_at as sent_on) is copied in, so a report counts
    # these without a join; it holds nothing about the person.
    sa.Column("message_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("campaign", Name, nullable=True),
    sa.Column("step", sa.Integer, nullable=True),
    sa.Column("template", Name, nullable=True),
    sa.Column("variant", sa.String(64), nullable=True),
    sa.Column("sent_on", Time, nullable=True),
    # reports: a campaign's outcomes by the time their messages were queued
    sa.Index("ix_message_events_report", "campaign", "sent_on", "step", "template",
             "variant", "kind"),
    **_mysql,
)

conversions = sa.Table(
    "conversions",
    metadata,
    # A campaign's goal event that arrived within its window after one of its messages:
    # attributed to the campaign's most recent message before it, once per message
    # (version 10). user_id is NULL once the user is forgotten; the count stays.
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("campaign", Name, nullable=False),
    sa.Column("message_id", sa.BigInteger, nullable=False),
    sa.Column("user_id", Id, nullable=True),
    sa.Column("template", Name, nullable=True),
    sa.Column("variant", sa.String(64), nullable=True),
    sa.Column("event_id", sa.BigInteger, nullable=False),
    sa.Column("event_name", Name, nullable=False),
    sa.Column("converted_at", Time, nullable=False),
    sa.UniqueConstraint("message_id", name="uq_conversions_message"),
    sa.Index("ix_conversions_campaign", "campaign", "converted_at"),  # reports
    sa.Index("ix_conversions_user", "user_id"),  # forgetting a user
    **_mysql,
)

subscriptions = sa.Table(
    "subscriptions",
    metadata,
    sa.Column("user_id", Id, primary_key=True),
    sa.Column("topic", Name, primary_key=True),  # "marketing" for campaign messages
    sa.Column("unsubscribed_at", Time, nullable=True),
    sa.Column("updated_at", Time, nullable=False),
    **_mysql,
)

suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("address", sa.String(320), primary_key=True),  # lower-cased email address
    sa.Column("reason", sa.String(32), nullable=False),  # bounce | complaint | manual | ...
    sa.Column("source", Name, nullable=True),  # provider or operator
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("created_at", Time, nullable=False),
    **_mysql,
)


# -- ingest ----------------------------------------------------------------------------
anonymous_links = sa.Table(
    "anonymous_links",
    metadata,
    # An identify/alias said this anonymous id is this user: later anonymous-only events
    # with the id are stored for the user at once.
    sa.Column("anonymous_id", Id, primary_key=True),
    sa.Column("user_id", Id, nullable=False),
    sa.Column("linked_at", Time, nullable=False),
    sa.Index("ix_anonymous_links_user", "user_id"),  # forgetting a user
    **_mysql,
)

forgotten = sa.Table(
    "forgotten",
    metadata,
    # Users forgotten recently, by the SHA-256 (hex) of their id: ingest refuses their
    # late events and identifies for ``[retention] forget_window`` (409), so a retry or a
    # queued event does not bring them back. ``PUT /v1/users/{id}`` deletes the row.
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("forgotten_at", Time, nullable=False),
    **_mysql,
)

devices = sa.Table(
    "devices",
    metadata,
    # Push device tokens (Customer.io ``PUT /api/v1/customers/{id}/devices``): a token
    # belongs to one user; adding it to another moves it. Forgetting the user deletes them.
    sa.Column("token", sa.String(255), primary_key=True),
    sa.Column("user_id", Id, nullable=False),
    sa.Column("platform", sa.String(16), nullable=False),  # ios | android
    sa.Column("last_used", Time, nullable=True),  # as the client said, else None
    sa.Column("attributes", Json, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Index("ix_devices_user", "user_id"),  # a user's devices (user view, forget, merge)
    **_mysql,
)


# -- segments and transactions -----------------------------------------------------------
engine_cursors = sa.Table(
    "engine_cursors",
    metadata,
    # How far an ingest consumer ("segments", "transactions") has processed the store,
    # so that at start it catches up with what was committed while it was not running.
    sa.Column("name", Name, primary_key=True),
    sa.Column("last_event_id", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_user_updated_at", Time, nullable=True),
    sa.Column("updated_at", Time, nullable=False),
    **_mysql,
)


# -- data sources and broadcasts ---------------------------------------------------------
audience_members = sa.Table(
    "audience_members",
    metadata,
    # The profiles of a customer-database audience as of its last sync: an audience
    # segment is `SELECT user_id AS id FROM audience_members WHERE audience = :audience`.
    sa.Column("audience", Name, primary_key=True),
    sa.Column("user_id", Id, primary_key=True),
    sa.Column("joined_at", Time, nullable=False),  # the sync that first returned it
    sa.Index("ix_audience_members_user", "user_id"),  # preload: the audiences of a user
    **_mysql,
)

broadcasts = sa.Table(
    "broadcasts",
    metadata,
    # One-off sends to a segment or audience: the last user id handled (in
    # id order), so a broadcast interrupted by a restart resumes after it (``after``).
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", Name, nullable=True),  # the operator's label for it
    sa.Column("template", Name, nullable=True),  # a template to send, or
    sa.Column("campaign", Name, nullable=True),  # a campaign whose flow to start
    sa.Column("segment", Name, nullable=False),  # whose members it goes to
    sa.Column("data", Json, nullable=True),  # template context / flow data
    sa.Column("rate", sa.Float, nullable=False),  # users per second, at most
    sa.Column("status", sa.String(16), nullable=False),  # running | completed | failed
    sa.Column("after", Id, nullable=True),
    sa.Column("total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("done", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("finished_at", Time, nullable=True),
    sa.Column("topic", Name, nullable=True),  # what its users opt out of (version 10)
    sa.Index("ix_broadcasts_status", "status"),  # resuming running broadcasts at start
    **_mysql,
)


@sa.event.listens_for(metadata, "before_create")
def _collation(target: sa.MetaData, connection: sa.Connection, **_kw: object) -> None:
    # The URL says mysql:// for MySQL and MariaDB alike; the server is known only now.
    if connection.dialect.name != "mysql":
        return
    collation = MARIADB_COLLATION if getattr(connection.dialect, "is_mariadb", False) \
        else MYSQL_COLLATION
    for table in target.tables.values():
        table.dialect_kwargs["mysql_collate"] = collation
