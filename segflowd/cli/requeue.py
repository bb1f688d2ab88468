"""``segflowd requeue``: queue failed or unknown messages again, in bulk, on purpose.

After an outage that failed messages (a rotated password before the outage circuit
existed, a provider that refused everything for an hour) or a crash that left some
``unknown``, the operator decides what goes out again::

    segflowd requeue --status failed --since 2026-03-01T09:00 --error-like "535"

It prints how many messages match and asks for a ``y`` on standard input (``--yes``
skips the question), then sets them ``queued`` with their attempts reset; a running
daemon sends them within ``[email] poll_interval``. ``unknown`` messages may have been
delivered already: requeueing them may deliver them twice, which is why it is asked.
Exit status: 0 done (or nothing matched); 1 the store failed, or not confirmed; 2 a bad
configuration or argument.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

import sqlalchemy as sa

from ..config import Config, load_config
from ..errors import ConfigError, SegflowError
from ..schema import messages
from ..store import Store
from .storeaccess import with_store

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
STATUSES = ("failed", "unknown")
CHUNK = 1000  # message ids per UPDATE


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("requeue", parents=[common],
                       help="queue failed or unknown messages again (asks first)")
    p.add_argument("--status", required=True, choices=STATUSES,
                   help="the messages' status now")
    _filters(p)
    u = sub.add_parser("retry-unknown", parents=[common],
                       help="queue unknown messages again: requeue --status unknown")
    _filters(u)
    u.set_defaults(handler=run, command="retry-unknown", status="unknown")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", metavar="TIME",
                   help="only those that got it at or after TIME (ISO 8601; naive is UTC)")
    p.add_argument("--error-like", metavar="TEXT",
                   help="only those whose last error contains TEXT")
    p.add_argument("--campaign", metavar="NAME", help="only this campaign's messages")
    p.add_argument("--yes", action="store_true", help="do not ask: requeue them")
    p.set_defaults(handler=run, command="requeue")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        since = None if args.since is None else _time(args.since)
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    where = [messages.c.status == args.status]
    if since is not None:
        where.append(messages.c.updated_at >= since)
    if args.error_like:
        where.append(messages.c.last_error.contains(args.error_like, autoescape=True))
    if args.campaign:
        where.append(messages.c.campaign == args.campaign)
    try:
        ids = _matching(config, where)
        what = _describe(args, len(ids))
        if not ids:
            print(f"no {args.status} message matches: nothing to requeue")
            return EXIT_OK
        if not args.yes and not _confirmed(what, args.status):
            return _fail(f"not confirmed: {what} left as they are", EXIT_FAILURE)
        done = _requeue(config, ids, args.status)
    except SegflowError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    print(f"queued {done} message{'s' if done != 1 else ''} again "
          f"({len(ids) - done} changed status meanwhile and were left)" if done != len(ids)
          else f"queued {done} message{'s' if done != 1 else ''} again")
    return EXIT_OK


def _time(text: str) -> dt.datetime:
    value = text.strip()
    try:
        t = dt.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        raise ValueError(f"--since: not an ISO 8601 time: {text!r} "
                         "(e.g. 2026-03-01T09:00:00Z)") from None
    return t.astimezone(dt.UTC).replace(tzinfo=None) if t.tzinfo else t


def _describe(args: argparse.Namespace, n: int) -> str:
    parts = [f"{n} {args.status} message{'s' if n != 1 else ''}"]
    if args.since:
        parts.append(f"since {args.since}")
    if args.error_like:
        parts.append(f"with an error containing {args.error_like!r}")
    if args.campaign:
        parts.append(f"of campaign {args.campaign!r}")
    return " ".join(parts)


def _confirmed(what: str, status: str) -> bool:
    warning = (" (unknown messages may have been delivered: they may arrive twice)"
               if status == "unknown" else "")
    print(f"{what} will be queued again{warning}. Requeue them? [y/N] ", end="",
          file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def _fail(message: str, code: int) -> int:
    print(f"segflowd: {message}", file=sys.stderr)
    return code


def _matching(config: Config, where: list[sa.ColumnElement[bool]]) -> list[int]:
    ids: list[int] = []

    async def read(store: Store) -> None:
        async with store.connect() as conn:
            ids.extend(int(i) for (i,) in await conn.execute(
                sa.select(messages.c.id).where(*where).order_by(messages.c.id)))

    with_store(config, read)
    return ids


def _requeue(config: Config, ids: list[int], status: str) -> int:
    """Queue ``ids`` again, each only if it still has ``status``; how many were."""
    done = 0

    async def update(store: Store) -> None:
        nonlocal done
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        for i in range(0, len(ids), CHUNK):
            async with store.begin() as conn:
                result = await conn.execute(sa.update(messages).where(
                    messages.c.id.in_(ids[i:i + CHUNK]), messages.c.status == status)
                    .values(status="queued", attempts=0, next_attempt_at=now,
                            updated_at=now, last_error=None))
                done += int(result.rowcount or 0)

    with_store(config, update)
    return done
