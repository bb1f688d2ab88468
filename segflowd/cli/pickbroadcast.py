"""``segflowd broadcast``'s pick-and-send part: a data source's audience as the target.

``segflowd broadcast --data-source communities --values community_id=42 --template
spring-sale`` asks the daemon (action ``broadcast.launch`` with ``data_source`` and
``values``) to sync that audience under its generated segment and broadcast to it;
``--dry-run`` prints the audience's size and five sample profiles instead, writing
nothing. Values keep their types: each ``KEY=VALUE`` is JSON when it parses as a JSON
scalar, else text (:func:`segflowd.sources.picked.parse_value`), so ``community_id=42``
is the integer 42 and ``code='"42"'`` the text "42".

The rest of the command (the socket, ``--template``/``--campaign``, ``--rate``, the
reply) is :mod:`segflowd.cli.control`'s.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping

from ..sources.picked import PickError, parse_pairs
from .sources import format_rows

__all__ = ["add_arguments", "format_reply", "target_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The target arguments of ``segflowd broadcast``: a segment, or a data source's pick."""
    p.add_argument("segment", nargs="?",
                   help="the segment (or audience segment) to send to; or --data-source")
    p.add_argument("--data-source", metavar="NAME",
                   help="send to the audience of this data source for --values (picked "
                        "at run time; no code change)")
    p.add_argument("--values", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="the audience query's placeholder values (JSON if it parses, "
                        "else text)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --data-source: print the audience's size and five sample "
                        "profiles, send nothing")


def target_args(a: argparse.Namespace) -> dict[str, object]:
    """The action arguments naming the target; ArgumentTypeError for a bad combination."""
    if a.data_source is None:
        if a.values or a.dry_run:
            raise argparse.ArgumentTypeError(
                f"{'--values' if a.values else '--dry-run'} goes with --data-source")
        if a.segment is None:
            raise argparse.ArgumentTypeError(
                "give a segment, or --data-source NAME --values KEY=VALUE ...")
        return {"segment": a.segment}
    if a.segment is not None:
        raise argparse.ArgumentTypeError(
            f"give a segment ({a.segment!r}) or --data-source, not both")
    try:
        values = parse_pairs(a.values or [])
    except PickError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    out: dict[str, object] = {"data_source": a.data_source, "values": values}
    if a.dry_run:
        out["dry_run"] = True
    return out


def format_reply(value: object) -> str | None:
    """A dry run's reply as text (None for any other reply)."""
    if not isinstance(value, Mapping) or value.get("dry_run") is not True:
        return None
    sample = value.get("sample")
    rows = [dict(r) for r in sample if isinstance(r, Mapping)] \
        if isinstance(sample, list) else []
    what = f"template {value.get('template')}" if value.get("template") is not None \
        else f"campaign {value.get('campaign')}"
    values = json.dumps(value.get("values"), sort_keys=True)
    lines = [f"dry run: {what} to data source {value.get('data_source')} {values}",
             f"segment: {value.get('segment')}",
             f"audience: {value.get('count')} profiles (nothing was written or sent)",
             f"sample ({len(rows)}):", format_rows(rows)]
    return "\n".join(lines)
