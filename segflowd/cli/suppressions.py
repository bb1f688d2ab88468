"""``segflowd suppressions list|remove|export``: review and undo the suppression list.

Read straight from the store (no daemon needed, nothing else changes). Each row has the
address, its reason (``bounce:550 5.1.1`` for an SMTP code, ``bounce:HardBounce`` for a
webhook's bounce type, ``complaint``, ``unsubscribed``, ``manual``), its source (the
provider, ``link`` for an unsubscribe link, or whoever added it) and when it was added.
``remove`` takes an address off the list: it may be mailed again from the next batch on.
Exit status: 0 done; 1 the store failed, or ``remove`` found no such address; 2 a bad
configuration or argument.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import sqlalchemy as sa

from ..config import Config, load_config
from ..errors import ConfigError, SegflowError
from ..schema import suppressions
from ..store import Store
from .storeaccess import NotFound, with_store

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
COLUMNS = ("address", "reason", "source", "created_at", "detail")
DETAIL_SHOWN = 60  # characters of the detail in the table (JSON and CSV keep it whole)

Row = dict[str, str]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("suppressions", parents=[common],
                       help="list, remove or export suppressed addresses (from the store)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("list", "print the suppressed addresses, newest first"),
                       ("export", "write the suppressed addresses as CSV")):
        a = actions.add_parser(name, parents=[common], help=text)
        a.add_argument("--reason", metavar="KIND",
                       help="only this reason (bounce, complaint, ...; bounce:HardBounce)")
        a.add_argument("--source", metavar="NAME", help="only this source (a provider, ...)")
        if name == "list":
            a.add_argument("--json", action="store_true", help="print JSON lines")
        else:
            a.add_argument("--out", metavar="FILE", help="write to FILE (default: stdout)")
    r = actions.add_parser("remove", parents=[common],
                           help="take an address off the suppression list")
    r.add_argument("address", help="the email address (case does not matter)")
    p.set_defaults(handler=run, command="suppressions")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        if args.action == "remove":
            print(_remove(config, args.address))
            return EXIT_OK
        rows = _rows(config, args.reason, args.source)
    except SegflowError as exc:  # the store failed, or no such address to remove
        return _fail(str(exc), EXIT_FAILURE)
    if args.action == "export":
        return _export(rows, args.out)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(_table(rows))
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"segflowd: {message}", file=sys.stderr)
    return code


# -- the store ---------------------------------------------------------------------------

def _rows(config: Config, reason: str | None, source: str | None) -> list[Row]:
    query = sa.select(suppressions).order_by(suppressions.c.created_at.desc(),
                                             suppressions.c.address)
    if reason:
        query = query.where(sa.or_(suppressions.c.reason == reason,
                                   suppressions.c.reason.startswith(f"{reason}:",
                                                                    autoescape=True)))
    if source:
        query = query.where(suppressions.c.source == source)
    out: list[Row] = []

    async def read(store: Store) -> None:
        async with store.connect() as conn:
            out.extend(_row(r) for r in (await conn.execute(query)).mappings())

    with_store(config, read)
    return out


def _remove(config: Config, address: str) -> str:
    addr = address.strip().lower()
    said: list[str] = []

    async def remove(store: Store) -> None:
        async with store.begin() as conn:
            found = (await conn.execute(sa.select(suppressions).where(
                suppressions.c.address == addr))).mappings().first()
            if found is None:
                raise NotFound(f"{addr} is not on the suppression list")
            await conn.execute(sa.delete(suppressions).where(suppressions.c.address == addr))
        row = _row(found)
        said.append(f"removed {addr} (was: {row['reason']}, source {row['source'] or '-'}, "
                    f"since {row['created_at']})")

    with_store(config, remove, empty=f"{addr} is not on the suppression list "
                                      "(the store is empty)")
    return said[0] if said else ""


# -- output ------------------------------------------------------------------------------

def _row(r: sa.RowMapping) -> Row:
    return {"address": str(r["address"]), "reason": str(r["reason"]),
            "source": "" if r["source"] is None else str(r["source"]),
            "created_at": _time(r["created_at"]),
            "detail": "" if r["detail"] is None else str(r["detail"])}


def _time(value: object) -> str:
    if isinstance(value, dt.datetime):  # stored as naive UTC
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return aware.isoformat(timespec="seconds")
    return str(value)


def _table(rows: Sequence[Row]) -> str:
    if not rows:
        return "(no suppressed addresses)"
    cells = [[r["address"], r["reason"], r["source"] or "-", r["created_at"],
              _clip(r["detail"])] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    lines.append(f"{len(rows)} suppressed address{'es' if len(rows) != 1 else ''}")
    return "\n".join(lines)


def _clip(text: str) -> str:
    text = " ".join(text.split())  # a server's multi-line reply on one line
    return text if len(text) <= DETAIL_SHOWN else text[:DETAIL_SHOWN - 1] + "…"


def _export(rows: Sequence[Row], out: str | None) -> int:
    buffer = io.StringIO(newline="")
    _write_csv(rows, buffer)
    if out is None:
        sys.stdout.write(buffer.getvalue())
        return EXIT_OK
    try:
        Path(out).write_text(buffer.getvalue(), encoding="utf-8", newline="")
    except OSError as exc:
        return _fail(f"cannot write {out}: {exc.strerror or exc}", EXIT_FAILURE)
    print(f"{len(rows)} suppressed address{'es' if len(rows) != 1 else ''} written to {out}")
    return EXIT_OK


def _write_csv(rows: Sequence[Row], stream: TextIO) -> None:
    writer = csv.DictWriter(stream, fieldnames=COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
