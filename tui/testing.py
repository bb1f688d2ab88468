"""A backend with fixed data, for snapshot tests and demos: no daemon, no clock, no socket.

``FixedBackend()`` is a healthy daemon; ``FixedBackend(alarmed=True)`` one where every
dashboard panel crosses its threshold (ALARMED_STATUS).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Mapping

import anyio

from segflowd.control.client import StreamBatch
from segflowd.errors import ControlReplyError

__all__ = ["ALARMED_STATUS", "FixedBackend"]

_T = "2026-03-01T09:0{}:00Z"

STATUS: dict[str, object] = {
    "version": "0.1.0", "protocol": 1, "uptime_s": 7384.0, "now": "2026-03-01T11:03:04Z",
    "store": {"dialect": "mariadb", "schema_version": 1, "pool_size": 10, "checked_out": 2,
              "healthy": True, "last_ping_ms": 0.4, "url": "mysql+aiomysql://segflow@db/s"},
    "bus": {"published": 120345, "subscribers": 2, "dropped": 0},
    "rates": {"ingest_per_s": 412.0, "sent_per_s": 23.0, "failed_per_s": 0.0},
    "outbox": {"queued": 57, "sending": 4},
    "wheel": {"size": 1893, "lateness_s": 0.012},
    "history": [
        {"ingest_per_s": float(300 + (i * 37) % 180), "sent_per_s": float(10 + (i * 7) % 20),
         "outbox": float(40 + (i * 13) % 30), "lateness_s": 0.01 * (i % 5)}
        for i in range(60)
    ],
    "health": {
        "oldest_queued_s": 4.2, "failures_1h": 1,
        "top_errors": [{"error": "550 mailbox unavailable", "where": "message", "count": 1}],
        "instances": {"failed": 0, "diverged": 0},
        "campaigns": {"onboarding": {"entries_1h": 64, "failures_1h": 1},
                      "winback": {"entries_1h": 0, "failures_1h": 0}},
    },
    "dashboard": {"store_latency_ms": 100.0, "outbox_depth": 10000, "oldest_queued_s": 600.0,
                  "lateness_s": 5.0, "failures_per_hour": 10, "failed_instances": 1,
                  "campaign_failures_per_hour": 5},
    "app": {"segments": 2, "campaigns": 2, "templates": 4, "transactions": 1},
    "actions": ["campaign.pause", "campaign.resume", "message.retry", "segment.refresh"],
    "stats": {"ingest": {"requests": 98122, "rejected": 3},
              "control": {"connections": 2, "requests": 51}},
}
CAMPAIGNS: list[dict[str, object]] = [
    {"name": "onboarding", "version": "9f2c4e1ab3d07c55", "defined": True, "live": 412,
     "instances": {"running": 2, "waiting": 410, "completed": 1290, "exited": 31, "failed": 1,
                   "diverged": 0, "terminated": 0}, "total": 1734},
    {"name": "winback", "version": "03b1de9a7c2f4410", "defined": True, "live": 37,
     "paused": True, "waiting_entries": 14,
     "instances": {"running": 0, "waiting": 37, "completed": 88, "exited": 5, "failed": 0,
                   "diverged": 2, "terminated": 1}, "total": 133},
]
FUNNEL: dict[str, object] = {
    **CAMPAIGNS[0],
    "funnel": [
        {"seq": 0, "kind": "send_email", "name": "welcome", "reached": 1734, "here": 12},
        {"seq": 1, "kind": "wait", "name": "2d", "reached": 1720, "here": 380},
        {"seq": 2, "kind": "branch", "name": "activated?", "reached": 1340, "here": 0},
        {"seq": 3, "kind": "send_email", "name": "tips", "reached": 1101, "here": 18},
    ],
}
SEGMENTS: list[dict[str, object]] = [
    {"name": "active", "defined": True, "refresh_s": 3600.0, "size": 5120,
     "last_refresh_at": "2026-03-01T10:00:00Z", "next_refresh_at": "2026-03-01T11:00:00Z",
     "last_error": None},
    {"name": "trial_ending", "defined": True, "refresh_s": 600.0, "size": 87,
     "last_refresh_at": "2026-03-01T10:50:00Z", "next_refresh_at": "2026-03-01T11:00:00Z",
     "last_error": None},
]
LONG_ERROR = ("smtp: 451 4.7.1 greylisted: the receiving server asked us to try again "
              "later; it said 'Service unavailable - try again in 300 seconds, see "
              "https://mx.example.net/greylisting for why' after RCPT TO")
MESSAGES: list[dict[str, object]] = [
    {"id": 3, "user_id": "u3", "kind": "transaction", "campaign": None,
     "transaction": "receipt", "template": "receipt", "to": "cy@example.com",
     "status": "queued", "attempts": 0, "last_error": None, "created_at": _T.format(2)},
    {"id": 2, "user_id": "u2", "kind": "campaign", "campaign": "onboarding",
     "transaction": None, "template": "welcome", "to": "bob@example.com", "status": "failed",
     "attempts": 5, "last_error": LONG_ERROR, "created_at": _T.format(1)},
    {"id": 1, "user_id": "u1", "kind": "campaign", "campaign": "onboarding",
     "transaction": None, "template": "welcome", "to": "ann@example.com", "status": "sent",
     "attempts": 1, "last_error": None, "created_at": _T.format(0)},
]
USER: dict[str, object] = {
    "id": "u1", "known": True, "email": "ann@example.com",
    "attributes": {"plan": "pro", "name": "Ann"},
    "segments": [{"name": "active", "entered_at": _T.format(1)}],
    "segment_changes": [
        {"segment": "active", "entered": True, "at": _T.format(1)},
        {"segment": "trial_ending", "entered": False, "at": _T.format(4)},
        {"segment": "trial_ending", "entered": True, "at": "2026-03-01T08:00:00Z"},
    ],
    "engagement": [
        {"message_id": 1, "kind": "click", "url": "https://example.com/start", "hits": 2,
         "machine": False, "at": _T.format(5), "last_at": _T.format(6)},
        {"message_id": 1, "kind": "open", "url": None, "hits": 1, "machine": False,
         "at": _T.format(4), "last_at": None},
    ],
    "instances": [
        {"id": 1, "campaign": "onboarding", "version": "9f2c4e1a", "status": "waiting",
         "live": True, "error": None, "created_at": _T.format(1), "ended_at": None,
         "updated_at": _T.format(3),
         "journal": [{"seq": 0, "kind": "send_email", "name": "welcome", "at": _T.format(2)},
                     {"seq": 1, "kind": "wait", "name": "2d", "at": _T.format(3)}]},
    ],
    "messages": [MESSAGES[2]],
    "events": [{"id": 1, "name": "signed_up", "attributes": {}, "at": _T.format(0)}],
}
EVENTS: list[dict[str, object]] = [
    {"seq": 1, "kind": "event.ingested", "at": "2026-03-01T11:02:58Z", "user_id": "u9",
     "name": "page_viewed"},
    {"seq": 2, "kind": "segment.entered", "at": "2026-03-01T11:02:59Z", "user_id": "u9",
     "segment": "active"},
    {"seq": 3, "kind": "flow.entered", "at": "2026-03-01T11:02:59Z", "user_id": "u9",
     "campaign": "onboarding"},
    {"seq": 4, "kind": "message.sent", "at": "2026-03-01T11:03:00Z", "user_id": "u9",
     "campaign": "onboarding", "template": "welcome"},
    {"seq": 5, "kind": "message.failed", "at": "2026-03-01T11:03:01Z", "user_id": "u2",
     "campaign": "winback", "error": "550 mailbox unavailable"},
]


ALARMED_STATUS: dict[str, object] = {
    **STATUS,
    "store": {**STATUS["store"], "last_ping_ms": 250.0},  # type: ignore[dict-item]
    "rates": {"ingest_per_s": 390.0, "sent_per_s": 0.0, "failed_per_s": 4.0},
    "outbox": {"queued": 15230, "claimed": 100, "sending": 8},
    "wheel": {"size": 1893, "lateness_s": 42.5},
    "history": [  # the outbox grows and the timers fall behind
        {"ingest_per_s": 390.0, "sent_per_s": float(max(0, 20 - i)), "outbox": 250.0 * i,
         "lateness_s": 0.75 * i} for i in range(60)],
    "health": {
        "oldest_queued_s": 5400.0, "failures_1h": 361,
        "top_errors": [
            {"error": LONG_ERROR, "where": "message", "count": 240},
            {"error": "550 mailbox unavailable", "where": "message", "count": 118},
            {"error": "KeyError: 'plan'", "where": "instance", "count": 3},
        ],
        "instances": {"failed": 3, "diverged": 2},
        "campaigns": {"onboarding": {"entries_1h": 64, "failures_1h": 358},
                      "winback": {"entries_1h": 0, "failures_1h": 3}},
    },
    "stats": {**STATUS["stats"], "delivery": {"providers": [  # type: ignore[dict-item]
        {"name": "smtp", "plugin": "smtp", "outage_since": "2026-03-01T10:05:00Z",
         "outage_error": "connection refused"}]}},
}


class FixedBackend:
    """Answers every request from the fixed data above; records the actions it was asked."""

    description = "fixed test data"

    def __init__(self, *, alarmed: bool = False) -> None:
        self.actions: list[tuple[str, dict[str, object]]] = []
        self.alarmed = alarmed

    async def connect(self) -> str:
        return "0.1.0"

    async def request(self, op: str, **args: object) -> object:
        data: dict[str, object] = {
            "status": ALARMED_STATUS if self.alarmed else STATUS,
            "campaigns": CAMPAIGNS, "segments": SEGMENTS,
            "messages": [m for m in MESSAGES if m["status"] == "failed"]
            if args.get("failures") else MESSAGES,
        }
        if op == "campaign":
            if args.get("name") != FUNNEL["name"]:
                raise ControlReplyError("not_found", f"no campaign named {args.get('name')!r}")
            return copy.deepcopy(FUNNEL)
        if op == "user":
            if args.get("id") != USER["id"]:
                raise ControlReplyError("not_found", f"no user with id {args.get('id')!r}")
            return copy.deepcopy(USER)
        return copy.deepcopy(data[op])

    async def action(self, name: str, args: Mapping[str, object]) -> object:
        self.actions.append((name, dict(args)))
        return None

    async def stream(self) -> AsyncIterator[StreamBatch]:
        yield StreamBatch(tuple(EVENTS), 0, 0)
        await anyio.sleep_forever()

    async def close(self) -> None:
        return None
