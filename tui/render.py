"""Pure formatting for the TUI: numbers, times, feed lines, filters, the user timeline."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from rich.text import Text

__all__ = ["FeedFilter", "feed_line", "message_details", "segment_details", "short_time",
           "timeline", "value"]


def value(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def short_time(v: object) -> str:
    """``2026-03-01T09:00:00.123Z`` → ``2026-03-01 09:00:00``."""
    if not isinstance(v, str) or not v:
        return "-"
    return v.replace("T", " ").rstrip("Z").split(".")[0]


@dataclasses.dataclass(frozen=True)
class FeedFilter:
    """``campaign:welcome user:u1 kind:flow`` (all must match); a bare word matches any field."""

    campaign: str = ""
    user: str = ""
    kind: str = ""
    words: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FeedFilter:
        fields: dict[str, str] = {}
        words: list[str] = []
        for token in text.split():
            key, sep, rest = token.partition(":")
            if sep and key in ("campaign", "user", "kind") and rest:
                fields[key] = rest
            else:
                words.append(token.lower())
        return cls(words=tuple(words), **fields)

    def matches(self, event: Mapping[str, object]) -> bool:
        kind = str(event.get("kind", ""))
        if self.kind and not (kind == self.kind or kind.startswith(self.kind + ".")):
            return False
        if self.campaign and str(event.get("campaign", "")) != self.campaign:
            return False
        if self.user and str(event.get("user_id", "")) != self.user:
            return False
        if self.words:
            blob = " ".join(str(v) for v in event.values()).lower()
            return all(w in blob for w in self.words)
        return True


_KIND_STYLE = {"failed": "bold red", "diverged": "bold magenta", "sent": "green",
               "entered": "cyan", "exited": "yellow", "ingested": "dim"}
_SKIP = {"seq", "kind", "at"}


def feed_line(event: Mapping[str, object]) -> Text:
    kind = str(event.get("kind", "?"))
    style = _KIND_STYLE.get(kind.rsplit(".", 1)[-1], "")
    at = short_time(event.get("at"))[11:]
    line = Text(f"{at} ", style="dim")
    line.append(f"{kind:<18}", style=style or "bold")
    rest = " ".join(f"{k}={value(v)}" for k, v in event.items() if k not in _SKIP)
    line.append(" " + rest)
    return line


def timeline(user: Mapping[str, object]) -> Text:
    """A user's journey, oldest first: events, instances with their journal, messages."""
    entries: list[tuple[str, Text]] = []

    def add(at: object, label: str, detail: str, style: str = "") -> None:
        t = Text(f"{short_time(at)}  ", style="dim")
        t.append(f"{label:<22}", style=style or "bold")
        t.append(detail)
        entries.append((str(at or ""), t))

    for e in _dicts(user.get("events")):
        add(e.get("at"), "event", str(e.get("name")), "blue")
    changes = user.get("segment_changes")
    if isinstance(changes, list):  # entries and exits, with their times
        for c in _dicts(changes):
            entered = bool(c.get("entered"))
            add(c.get("at"), "segment entered" if entered else "segment left",
                str(c.get("segment")), "cyan" if entered else "yellow")
    else:  # a daemon that sends only the current memberships
        for s in _dicts(user.get("segments")):
            add(s.get("entered_at"), "segment entered", str(s.get("name")), "cyan")
    for i in _dicts(user.get("instances")):
        head = f"{i.get('campaign')} #{i.get('id')} v{i.get('version')}"
        add(i.get("created_at"), "flow started", head, "bold cyan")
        for j in _dicts(i.get("journal")):
            add(j.get("at"), f"  {j.get('kind')}", f"{j.get('name') or ''}  ({head})")
        status = str(i.get("status"))
        if i.get("ended_at") or status in ("failed", "diverged"):
            style = "bold red" if status in ("failed", "diverged") else "yellow"
            detail = head + (f": {i.get('error')}" if i.get("error") else "")
            add(i.get("ended_at") or i.get("updated_at"), f"flow {status}", detail, style)
    for m in _dicts(user.get("messages")):
        status = str(m.get("status"))
        style = "red" if status in ("failed", "unknown") else "green"
        err = f" — {m.get('last_error')}" if m.get("last_error") else ""
        to = value(m.get("to"))
        add(m.get("created_at"), f"email {status}", f"{m.get('template')} to {to}{err}", style)
    templates = {m.get("id"): m.get("template") for m in _dicts(user.get("messages"))}
    for g in _dicts(user.get("engagement")):
        kind = "opened" if g.get("kind") == "open" else "clicked"
        what = f"{templates.get(g.get('message_id')) or 'message'} #{g.get('message_id')}"
        url = f" {g.get('url')}" if g.get("url") else ""
        hits = int(str(g.get("hits") or 1))
        extra = (f" ({hits} times)" if hits > 1 else "") + (
            " (a machine: prefetch or scanner)" if g.get("machine") else "")
        add(g.get("at"), f"email {kind}", f"{what}{url}{extra}", "magenta")
    entries.sort(key=lambda e: e[0])
    top = Text(f"{user.get('id')}  {value(user.get('email'))}\n", style="bold")
    top.append(f"attributes: {user.get('attributes')}\n")
    segs = ", ".join(str(s.get("name")) for s in _dicts(user.get("segments")))
    top.append(f"segments: {segs or '-'}\n")
    return Text("\n").join([top, *(t for _, t in entries)])


def message_details(m: Mapping[str, object]) -> Text:
    """Every field of one message, its last error in full (wrapped by the pane)."""
    out = Text()
    for key in ("id", "user_id", "kind", "campaign", "transaction", "instance_id", "template",
                "to", "status", "provider", "attempts", "created_at", "updated_at", "sent_at",
                "next_attempt_at"):
        if key in m:
            out.append(f"{key:<16}", style="bold")
            out.append(f"{value(m.get(key))}\n")
    out.append("\nlast error\n", style="bold")
    out.append(str(m.get("last_error") or "none"), style="red" if m.get("last_error") else "")
    return out


def segment_details(s: Mapping[str, object]) -> Text:
    """One segment's refresh state, its last error in full."""
    out = Text()
    for key in ("name", "size", "refresh_s", "last_refresh_at", "next_refresh_at"):
        out.append(f"{key:<16}", style="bold")
        out.append(f"{value(s.get(key))}\n")
    out.append("\nlast error\n", style="bold")
    out.append(str(s.get("last_error") or "none"), style="red" if s.get("last_error") else "")
    return out


def _dicts(v: object) -> Sequence[Mapping[str, object]]:
    return [x for x in v if isinstance(x, Mapping)] if isinstance(v, list) else []
