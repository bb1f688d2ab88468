"""The TUI's tables as rows of strings: campaigns, segments, messages (pure formatting)."""

from __future__ import annotations

from collections.abc import Mapping

from .render import short_time, value

__all__ = ["INSTANCE_COLUMNS", "campaign_row", "keyed", "message_row", "rows", "segment_row"]

INSTANCE_COLUMNS = ("running", "waiting", "completed", "exited", "failed", "diverged",
                    "terminated")


def rows(v: object) -> list[Mapping[str, object]]:
    return [r for r in v if isinstance(r, Mapping)] if isinstance(v, list) else []


def keyed(v: object) -> dict[str, Mapping[str, object]]:
    """Rows by their table key: a message's id, a segment's name."""
    return {str(r.get("id", r.get("name"))): r for r in rows(v)}


def campaign_row(c: Mapping[str, object]) -> list[str]:
    inst = c.get("instances")
    counts = inst if isinstance(inst, Mapping) else {}
    version = str(c.get("version") or "-")[:8]
    state = "paused" if c.get("paused") else "active" if c.get("defined") else "removed"
    return [str(c.get("name")), state, version, value(c.get("live")),
            *(value(counts.get(s, 0)) for s in INSTANCE_COLUMNS), value(c.get("total"))]


def segment_row(s: Mapping[str, object]) -> list[str]:
    refresh = s.get("refresh_s")
    return [str(s.get("name")), value(s.get("size")),
            f"{float(str(refresh)):g}s" if refresh is not None else "-",
            short_time(s.get("last_refresh_at")), short_time(s.get("next_refresh_at")),
            str(s.get("last_error") or "")]


def message_row(m: Mapping[str, object]) -> list[str]:
    return [str(m.get("id")), short_time(m.get("created_at")), value(m.get("user_id")),
            _kind(m), value(m.get("campaign") or m.get("transaction")),
            value(m.get("template")), value(m.get("to")), value(m.get("status")),
            value(m.get("attempts")), str(m.get("last_error") or "")]


def _kind(m: Mapping[str, object]) -> str:
    """The message's kind, with its channel when it is not email: ``campaign sms``."""
    channel = m.get("channel")
    kind = value(m.get("kind"))
    return kind if channel in (None, "email") else f"{kind} {channel}"
