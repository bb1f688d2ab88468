"""``segflowd simulate``: a scripted scenario through the app's real engines, as a table.

    segflowd simulate --user ann '{"email": "ann@example.com", "name": "Ann"}' \\
        --event ann login 2026-01-01T00:00:00Z --days 40 [--campaign winback] [--out DIR]

Runs :class:`segflowd.testing.Simulation` for the app of the config (``--config``, as
every command): the users are created at ``--start`` (default: now), each event is
ingested at its time (an event after the start waits for it), then the clock runs to
the end. Prints what happened, one row each: time since the start, user, what, template
and subject. With ``--out`` every rendered message is also written as an .eml file.
Nothing touches the configured store or provider.

Exit status: 0 done; 1 the simulation failed (a line says why); 2 bad arguments, config
or app (a line naming the argument, or the same problem lines as ``segflowd check``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..app import Segflow
from ..config import load_config
from ..errors import AppError, ConfigError, SegflowError
from ..loader import load_app
from ..logs import configure_logging
from ..simulation import SentMessage, Simulation, TimelineEntry, parse_time

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
SUBJECT_WIDTH = 60  # characters of a subject shown in the table


class UsageError(ValueError):
    """A bad argument: one line naming it."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("simulate", parents=[common],
                       help="run a scripted scenario through the app under a virtual clock")
    p.add_argument("--user", nargs=2, action="append", default=[], metavar=("ID", "JSON"),
                   help="a user and their attributes as a JSON object (repeatable)")
    p.add_argument("--event", nargs="+", action="append", default=[],
                   metavar="USER NAME [TIME] [JSON]",
                   help="an event of a user: name, time (default: the start) and its "
                        "attributes as a JSON object (repeatable)")
    p.add_argument("--start", default=None, metavar="TIME",
                   help="the simulation's first moment, ISO 8601 (default: now)")
    p.add_argument("--days", type=float, default=0.0, help="how long to run, in days")
    p.add_argument("--hours", type=float, default=0.0, help="... and hours")
    p.add_argument("--campaign", default=None, metavar="NAME",
                   help="show only what concerns this campaign")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write every rendered message as an .eml file here")
    p.set_defaults(handler=run, command="simulate")


def _json_object(text: str, flag: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag}: must be a JSON object, like '{{\"name\": \"Ann\"}}'")
    return value


def _time(text: str, flag: str) -> dt.datetime:
    try:
        return parse_time(text, flag)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


Event = tuple[str, str, dt.datetime, dict[str, object]]


def _scenario(args: argparse.Namespace, app: Segflow
              ) -> tuple[dt.datetime, dict[str, dict[str, object]], list[Event], float]:
    start = (_time(args.start, "--start") if args.start is not None
             else dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0))
    users: dict[str, dict[str, object]] = {}
    for uid, text in args.user:
        users[uid] = _json_object(text, f"--user {uid}")
    events: list[Event] = []
    for given in args.event:
        flag = "--event " + " ".join(given[:2])
        if not 2 <= len(given) <= 4:
            raise UsageError(f"--event {' '.join(given)}: give USER NAME [TIME] [JSON]")
        uid, name, *rest = given
        if uid not in users:
            known = ", ".join(sorted(users)) or "none"
            raise UsageError(f"{flag}: unknown user {uid!r} (users given with --user: "
                             f"{known})")
        at, attributes = start, {}
        for part in rest:
            if part.lstrip().startswith("{"):
                attributes = _json_object(part, flag)
            else:
                at = _time(part, flag)
        events.append((uid, name, at, attributes))
    if args.campaign is not None and args.campaign not in app.campaigns:
        known = ", ".join(sorted(app.campaigns)) or "none"
        raise UsageError(f"--campaign: unknown campaign {args.campaign!r} (campaigns: "
                         f"{known})")
    seconds = args.days * 86400 + args.hours * 3600
    if not seconds >= 0:
        raise UsageError("--days/--hours: must not be negative")
    return start, users, sorted(events, key=lambda e: e[2]), seconds


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.daemon.log_format, "error")
    # What goes wrong in a flow is a row of the table (flow.failed, message.failed).
    logging.getLogger().setLevel(logging.CRITICAL)
    try:
        app = load_app(config.daemon.app, config.base_dir, validate=False)
        problems = app.problems()
    except AppError as exc:
        problems = [str(exc)]
    if problems:  # as `segflowd check` words them
        for problem in problems:
            print(f"problem: {problem}")
        print(f"simulate: the app has {len(problems)} problem"
              f"{'s' if len(problems) != 1 else ''}; nothing was simulated")
        return EXIT_USAGE
    try:
        start, users, events, seconds = _scenario(args, app)
    except UsageError as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Simulation(app, start=start, config=config.path) as sim:
            for uid, attributes in users.items():
                sim.user(uid, **attributes)
            for uid, name, at, attributes in events:
                if at > sim.now:
                    sim.advance(seconds=(at - sim.now).total_seconds())
                sim.event(uid, name, at, **attributes)
            end = start + dt.timedelta(seconds=seconds)
            if end > sim.now:
                sim.advance(seconds=(end - sim.now).total_seconds())
            timeline, sent = sim.timeline(), sim.sent()
    except (ValueError, SegflowError) as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print_table(timeline, sent, start, app, args.campaign)
    if args.out is not None:
        for path in write_eml(sent, Path(args.out)):
            print(f"wrote {path}")
    return EXIT_OK


def print_table(timeline: Sequence[TimelineEntry], sent: Sequence[SentMessage],
                start: dt.datetime, app: Segflow, campaign: str | None) -> None:
    by_id = {m.id: m for m in sent}
    rows = [("TIME", "USER", "WHAT", "TEMPLATE", "SUBJECT")]
    for e in timeline:
        if campaign is not None and not _concerns(e, campaign, app, by_id):
            continue
        what, template, subject = describe(e)
        mid = e.detail.get("message")
        message = by_id.get(mid) if isinstance(mid, int) else None
        if message is not None and message.campaign and e.kind.startswith("message."):
            what += f" {message.campaign}"
        rows.append((since(e.at, start), e.user_id, what, template, subject))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        cells = "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True))
        print(f"{cells}  {r[4]}".rstrip())
    shown = [m for m in sent if campaign is None or m.campaign == campaign]
    print(f"{len(rows) - 1} events, {len(shown)} messages sent")


def since(at: dt.datetime, start: dt.datetime) -> str:
    """``+2d 09:15:00``: how long after the start."""
    total = int((at - start).total_seconds())
    days, rest = divmod(total, 86400)
    return f"+{days}d {rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}"


def describe(e: TimelineEntry) -> tuple[str, str, str]:
    """(what happened, template, subject) of a timeline entry, for a person."""
    d = e.detail
    name = str(d.get("campaign") or d.get("segment") or d.get("transaction")
               or d.get("name") or "")
    what = f"{e.kind} {name}".strip()
    if e.kind == "flow.step":
        what += f": {d.get('command')}"
    for key in ("reason", "error", "url"):
        if d.get(key):
            what += f" ({d[key]})"
    template = str(d.get("template") or (d.get("name") if d.get("command") == "send_email"
                                         else "") or "")
    subject = str(d.get("subject") or "")[:SUBJECT_WIDTH]
    return what, template, subject


def _concerns(e: TimelineEntry, campaign: str, app: Segflow,
              by_id: Mapping[int, SentMessage]) -> bool:
    d = e.detail
    if "campaign" in d:
        return d["campaign"] == campaign
    if e.kind.startswith("segment."):
        c = app.campaigns[campaign]
        return d.get("segment") in (*c.segments, *c.exclude)
    message = d.get("message")
    if isinstance(message, int) and message in by_id:
        return by_id[message].campaign == campaign
    return e.kind == "event.ingested"


def write_eml(sent: Sequence[SentMessage], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, m in enumerate(sent, 1):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{m.user_id}-{m.template}")
        path = folder / f"{n:03d}-{safe}.eml"
        path.write_bytes(m.mime)
        paths.append(path)
    return paths
