"""``segflowd discover DATA_SOURCE``: run a data source's queries straight on its database.

For whoever writes the app: no daemon needed. By default it prints the discovery rows
(the audiences one can choose); with ``--audience KEY=VALUE ...`` it prints the first
rows of the audience for those values instead. The running daemon serves the same
discovery over the control socket (``segflowd audiences NAME``, action
``audiences.list``), and ``segflowd broadcast`` launches a broadcast there.
Exit status: 0 done; 1 the query failed (the database's message, naming the source);
2 a bad config, app or argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import anyio

from ..config import load_config
from ..errors import AppError, ConfigError, SegflowError
from ..loader import load_app
from ..sources.datasources import DataSources
from ..sources.pools import Row, StaticSources, open_source
from ..sources.values import json_value

__all__ = ["add_parser", "format_rows", "run"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_LIMIT = 50  # rows printed
MAX_CELL = 40  # characters of a value shown in the table


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("discover", parents=[common],
                       help="run a data source's discovery (or audience) query and print it")
    p.add_argument("data_source", help="the data source's name (app.data_source(NAME, ...))")
    p.add_argument("--audience", nargs="+", metavar="KEY=VALUE", default=None,
                   help="print the audience for these values instead of the discovery rows")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="rows to print at most")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    p.set_defaults(handler=run, command="discover")


def format_rows(rows: Sequence[Row]) -> str:
    """Rows as a plain text table (columns of the first row)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    text = "NULL" if value is None else (
        json.dumps(value) if isinstance(value, dict | list) else str(value))
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def _values(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--audience wants KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        app = load_app(config.daemon.app, config.base_dir)
        values = None if args.audience is None else _values(args.audience)
    except (ConfigError, AppError, ValueError) as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.data_source not in app.data_sources:
        known = ", ".join(sorted(app.data_sources)) or "none"
        print(f"segflowd: no data source {args.data_source!r} in the app (data sources: "
              f"{known})", file=sys.stderr)
        return EXIT_USAGE
    d = app.data_sources[args.data_source]
    if d.source not in config.sources:
        print(f"segflowd: data source {d.name!r} names [sources.{d.source}], which "
              "segflow.toml does not configure", file=sys.stderr)
        return EXIT_USAGE
    rows: list[Row] = []

    async def main() -> None:
        sources = StaticSources([open_source(config.sources[d.source])])
        ds = DataSources(sources, app.data_sources, app.audiences)
        try:
            if values is None:
                rows.extend(await ds.discover(d.name, limit=args.limit))
            else:
                async for batch in ds.audience(d.name, values):
                    rows.extend(batch)
                    if len(rows) >= args.limit:
                        break
                del rows[args.limit:]
        finally:
            await sources.aclose()

    try:
        anyio.run(main)
    except SegflowError as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        for r in rows:
            print(json.dumps({k: json_value(v) for k, v in r.items()}, sort_keys=False))
    else:
        print(format_rows(rows))
    return EXIT_OK
