"""A backend with fixed data, for snapshot tests and demos: no daemon, no clock, no socket."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Mapping

import anyio

from segflowd.control.client import StreamBatch
from segflowd.errors import ControlReplyError

__all__ = ["FixedBackend"]

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
     "paused": True,
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
MESSAGES: list[dict[str, object]] = [
    {"id": 3, "user_id": "u3", "kind": "transaction", "campaign": None,
     "transaction": "receipt", "template": "receipt", "to": "cy@example.com",
     "status": "queued", "attempts": 0, "last_error": None, "created_at": _T.format(2)},
    {"id": 2, "user_id": "u2", "kind": "campaign", "campaign": "onboarding",
     "transaction": None, "template": "welcome", "to": "bob@example.com", "status": "failed",
     "attempts": 5, "last_error": "550 mailbox unavailable", "created_at": _T.format(1)},
    {"id": 1, "user_id": "u1", "kind": "campaign", "campaign": "onboarding",
     "transaction": None, "template": "welcome", "to": "ann@example.com", "status": "sent",
     "attempts": 1, "last_error": None, "created_at": _T.format(0)},
]
USER: dict[str, object] = {
    "id": "u1", "known": True, "email": "ann@example.com",
    "attributes": {"plan": "pro", "name": "Ann"},
    "segments": [{"name": "active", "entered_at": _T.format(1)}],
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


class FixedBackend:
    """Answers every request from the fixed data above; records the actions it was asked."""

    description = "fixed test data"

    def __init__(self) -> None:
        self.actions: list[tuple[str, dict[str, object]]] = []

    async def connect(self) -> str:
        return "0.1.0"

    async def request(self, op: str, **args: object) -> object:
        data: dict[str, object] = {
            "status": STATUS, "campaigns": CAMPAIGNS, "segments": SEGMENTS,
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
