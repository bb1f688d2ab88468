"""``segflowd report [--campaign NAME] [--since DATE] [--json | --csv]``: campaign reports.

Read from the store (no daemon needed): one row per campaign, step, template, variant and
day with the counts and rates of :mod:`segflowd.reports`, then one per campaign and
variant with its conversion rate and the p-value against the control (``*`` marks a
winner). ``--json`` prints the whole report as one JSON object (the control action's
answer); ``--csv`` prints the rows as CSV (counts, then rates). Exit status: 0 done; 1
the store failed; 2 a bad configuration or argument.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence

from ..config import load_config
from ..errors import ConfigError, SegflowError, StoreError
from ..reports import COUNTS, RATES, Report, report
from ..reports.action import parse_since
from ..store import Store
from .storeaccess import with_store

__all__ = ["add_parser", "format_report", "run"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
KEYS = ("campaign", "step", "template", "variant", "day")
REPORTS_SCHEMA = 11  # the schema version that added message_events
# Table headings: the counts, shorter.
SHORT = {"queued": "queued", "sent": "sent", "failed": "failed", "suppressed": "supp",
         "delivered": "deliv", "bounced": "bounce", "complained": "compl",
         "opened_unique": "opened", "clicked_unique": "clicked", "unsubscribed": "unsub",
         "converted": "conv"}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("report", parents=[common],
                       help="campaign counts and rates per step, template, variant and day")
    p.add_argument("--campaign", metavar="NAME", help="only this campaign")
    p.add_argument("--since", metavar="DATE",
                   help="only messages queued at or after DATE (ISO date or time, UTC)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the report as JSON")
    out.add_argument("--csv", action="store_true", help="print the rows as CSV")
    p.set_defaults(handler=run, command="report")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        since = parse_since(args.since)
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    found: list[Report] = []

    async def read(store: Store) -> None:
        version = await store.read_schema_version() or 0
        if version < REPORTS_SCHEMA:
            raise StoreError(f"store {store.safe_url}: schema version {version} has no "
                             "reports yet; run segflowd migrate (or start the daemon) first")
        found.append(await report(store, campaign=args.campaign, since=since))

    try:
        with_store(config, read)
    except SegflowError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    result = found[0] if found else Report(args.campaign, since, (), ())
    if args.json:
        print(json.dumps(result.as_json()))
    elif args.csv:
        write_csv(result, sys.stdout)
    else:
        print(format_report(result))
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"segflowd: {message}", file=sys.stderr)
    return code


def write_csv(result: Report, stream: object) -> None:
    fields = [*KEYS, *COUNTS, *(f"{k}_rate" for k in RATES)]
    writer = csv.DictWriter(stream, fieldnames=fields, lineterminator="\r\n")  # type: ignore[arg-type]  # a text stream
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: "" if v is None else v for k, v in row.as_json().items()})


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _grid(head: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()
    return [line, "  ".join("-" * w for w in widths),
            *("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
              for r in cells)]


def format_report(result: Report) -> str:
    """The report as two plain-text tables: the rows, then the variants."""
    if not result.rows:
        return "(no campaign messages" + (f" of {result.campaign}" if result.campaign else "") \
            + (f" since {result.since.isoformat()}" if result.since else "") + ")"
    head = ["campaign", "step", "template", "variant", "day",
            *(SHORT[k] for k in COUNTS), "open%", "click%", "conv%"]
    cells = [[r.campaign, "-" if r.step is None else str(r.step), r.template,
              r.variant or "-", r.day.isoformat(), *(str(r.counts[k]) for k in COUNTS),
              _pct(r.rates["opened_unique"]), _pct(r.rates["clicked_unique"]),
              _pct(r.rates["converted"])] for r in result.rows]
    lines = _grid(head, cells)
    vcells = [[v.campaign, v.variant or "-", str(v.sent), str(v.converted),
               _pct(v.conversion_rate),
               "control" if v.control else ("-" if v.p_value is None else f"{v.p_value:.4f}"),
               "*" if v.winner else ""] for v in result.variants]
    lines += ["", *_grid(["campaign", "variant", "sent", "converted", "conv%", "p", "winner"],
                         vcells)]
    return "\n".join(lines)
