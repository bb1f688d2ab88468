"""``segflowd users show ID``: one user's journey, as the TUI shows it, over the control socket.

Like ``segflowd status``, it asks the running daemon (the control protocol's ``user``
query, the one the TUI's user screen reads), so it needs no store credentials and shows
what the daemon sees. It prints the user's attributes and current segments, then one
timeline, oldest first: segment entries and exits (``segment_changes``), campaign
instances with their journal steps and their end, messages with their recipient, status
and error, opens and clicks, and events. ``--json`` prints the query's reply as it is.

The daemon returns the latest :data:`~segflowd.control.queries.USER_LIMIT` of each kind.
Exit status: 0 shown; 1 the daemon is unreachable or knows no such user (one line on
stderr); 2 a bad config.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Mapping

import anyio

from ..control.client import ControlClient, resolve_socket
from ..errors import ConfigError, ControlError

__all__ = ["add_parser", "format_journey", "run"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Line = tuple[dt.datetime, int, str]  # when, order among equal times, text


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("users", parents=[common], help="look at one user (over the daemon)")
    users = p.add_subparsers(dest="users_command", metavar="SUBCOMMAND", required=True)
    show = users.add_parser("show", parents=[common],
                            help="a user's attributes, segments and journey")
    show.add_argument("user_id", metavar="ID", help="the user's id")
    show.add_argument("--socket", metavar="PATH",
                      help="the control socket (default: [daemon] control_socket)")
    show.add_argument("--json", action="store_true", help="print the reply as JSON")
    show.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        path = resolve_socket(args.socket, getattr(args, "config", None))
    except ConfigError as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    found: list[object] = []

    async def main() -> None:
        async with await ControlClient.connect(path) as client:
            found.append(await client.request("user", id=args.user_id))

    try:
        anyio.run(main)
    except ControlError as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    (user,) = found
    if args.json:
        print(json.dumps(user, indent=2, sort_keys=True))
    else:
        print(format_journey(user if isinstance(user, Mapping) else {}))
    return EXIT_OK


def format_journey(user: Mapping[str, object]) -> str:
    """The human form of a ``user`` reply (tolerates any field being absent)."""
    lines = [f"user {user.get('id')}" + ("" if user.get("known", True) else " (not in users)"),
             f"email:      {user.get('email') or '-'}",
             f"created:    {user.get('created_at') or '-'}",
             f"attributes: {json.dumps(user.get('attributes') or {}, sort_keys=True)}",
             "segments:   " + (", ".join(
                 f"{s.get('name')} (since {s.get('entered_at')})"
                 for s in _items(user, "segments")) or "-"),
             "", "journey (oldest first):"]
    timeline = sorted(_timeline(user), key=lambda line: (line[0], line[1]))
    lines += [f"  {_when(at)}  {text}" for at, _order, text in timeline] or ["  (nothing yet)"]
    return "\n".join(lines)


def _timeline(user: Mapping[str, object]) -> list[Line]:
    out: list[Line] = []

    def add(at: object, order: int, text: str) -> None:
        when = _parse(at)
        if when is not None:
            out.append((when, order, text))

    for c in _items(user, "segment_changes"):
        add(c.get("at"), 0, f"{'entered' if c.get('entered') else 'left'} segment "
                            f"{c.get('segment')}")
    for i in _items(user, "instances"):
        name = f"campaign {i.get('campaign')} #{i.get('id')}"
        add(i.get("created_at"), 1, f"{name} started (version {i.get('version')})")
        for j in _items(i, "journal"):
            add(j.get("at"), 2, f"{name} step {j.get('seq')}: {j.get('kind')} {j.get('name')}")
        if i.get("ended_at"):
            error = f": {i.get('error')}" if i.get("error") else ""
            add(i.get("ended_at"), 3, f"{name} ended {i.get('status')}{error}")
        elif i.get("error"):
            add(i.get("updated_at"), 3, f"{name} {i.get('status')}: {i.get('error')}")
    for m in _items(user, "messages"):
        what = m.get("campaign") or m.get("transaction") or m.get("kind")
        error = f"; error: {m.get('last_error')}" if m.get("last_error") else ""
        add(m.get("created_at"), 4,
            f"message {m.get('id')} {m.get('template')} ({what}) to {m.get('to') or '-'}: "
            f"{m.get('status')}{error}")
        if m.get("sent_at"):
            add(m.get("sent_at"), 5, f"message {m.get('id')} sent")
    for e in _items(user, "engagement"):
        kind = {"open": "opened", "click": "clicked"}.get(str(e.get("kind")), e.get("kind"))
        url = f" {e.get('url')}" if e.get("url") else ""
        machine = ", by a machine" if e.get("machine") else ""
        add(e.get("at"), 6, f"{kind} message {e.get('message_id')}{url} "
                            f"({e.get('hits')} hits{machine})")
    for e in _items(user, "events"):
        add(e.get("at"), 7, f"event {e.get('name')} "
                            f"{json.dumps(e.get('attributes') or {}, sort_keys=True)}")
    return out


def _items(parent: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
    value = parent.get(key)
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _parse(value: object) -> dt.datetime | None:
    """A reply's ISO-8601 UTC time (``...Z``) as a naive UTC datetime, or None."""
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value.removesuffix("Z"))
    except ValueError:
        return None
    return when.astimezone(dt.UTC).replace(tzinfo=None) if when.tzinfo else when


def _when(at: dt.datetime) -> str:
    return at.isoformat(sep=" ", timespec="seconds")
