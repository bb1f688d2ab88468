"""``rt.split(name, weights)``: experiments and holdouts, one variant per user, once.

A user's variant in a campaign's experiment ``name`` is decided the first time any of
their instances reaches the split: a stable hash of (campaign, user, name) is a fraction
in [0, 1) that walks the weights in the order written, and the choice is stored in
``flow_splits``. Every later split of that user in that experiment reads the stored row,
so new weights change only users not yet assigned. The store decides a race: the insert
skips an existing row and the row is read back, so two concurrent steps agree. The
variant is the step's journaled result, so a replay never decides again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Protocol

import sqlalchemy as sa

from ..schema import flow_splits
from ..store import Store
from ..userlocks import existing_users

__all__ = ["MAX_NAME", "MAX_VARIANT", "assign", "latest_variant", "pick", "split_problems",
           "weights_problem"]

MAX_NAME = 191  # characters of an experiment's name (flow_splits.name)
MAX_VARIANT = 64  # characters of a variant's name (flow_splits.variant, messages.variant)
_EXAMPLE = '{"a": 50, "b": 50}'


def _text(value: str) -> bool:
    """True when ``value`` can be stored: UTF-8 text (no lone surrogate)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _finite(weight: float) -> bool:
    """True when ``weight`` is a finite float (an int too large for one is not)."""
    try:
        return math.isfinite(weight)
    except OverflowError:
        return False


def weights_problem(name: object, weights: object) -> str | None:
    """What is wrong with ``rt.split(name, weights)``, in a sentence; None when nothing."""
    if (not isinstance(name, str) or not name or len(name) > MAX_NAME
            or not _text(name)):
        return (f"split() name must be a non-empty string of at most {MAX_NAME} "
                f"characters, not {name!r}")
    if not isinstance(weights, Mapping) or not weights:
        return (f"split({name!r}) weights must be a dict of variant name to weight, "
                f"e.g. {_EXAMPLE}, not {weights!r}")
    for variant, weight in weights.items():
        if (not isinstance(variant, str) or not 1 <= len(variant) <= MAX_VARIANT
                or not _text(variant)):
            return (f"split({name!r}) variant names must be strings of 1 to "
                    f"{MAX_VARIANT} characters, not {variant!r}")
        if (isinstance(weight, bool) or not isinstance(weight, int | float)
                or not _finite(weight) or weight < 0):
            return (f"split({name!r}) weight of {variant!r} must be a finite number of at "
                    f"least 0, not {weight!r}")
    total = sum(float(w) for w in weights.values())  # as pick() adds them
    if total <= 0:
        return f"split({name!r}) weights must sum to more than 0, not {dict(weights)!r}"
    if not math.isfinite(total):  # every user would fall past the last edge
        return f"split({name!r}) weights must sum to a finite number, not {dict(weights)!r}"
    return None


def pick(campaign: str, user_id: str, name: str, weights: Mapping[str, float]) -> str:
    """The variant the hash of (campaign, user, name) falls in; never a zero weight's."""
    digest = hashlib.sha256(f"{campaign}\0{user_id}\0{name}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2.0 ** 64 * sum(weights.values())
    chosen = None
    edge = 0.0
    for variant, weight in weights.items():
        if weight <= 0:
            continue
        chosen = variant
        edge += weight
        if point < edge:
            break
    assert chosen is not None, "weights were checked: some weight is above 0"
    return chosen  # rounding past the last edge: the last variant that has a weight


async def assign(store: Store, campaign: str, user_id: str, name: str,
                 args: Mapping[str, object], now: dt.datetime) -> str:
    """The user's variant in ``name``: the stored one, else one picked now and stored.

    Idempotent: a retried step, or two steps racing, read back the one stored row. Only
    a user who still exists is stored: a forget that commits while the step is in flight
    leaves no row naming them (the step then loses its round to the forget).
    """
    given = args.get("weights")
    assert isinstance(given, Mapping), "rt.split() built the arguments"
    weights = {str(k): float(v) for k, v in given.items() if isinstance(v, int | float)}
    fs = flow_splits.c
    key = (fs.campaign == campaign, fs.user_id == user_id, fs.name == name)
    variant = pick(campaign, user_id, name, weights)
    # The insert comes first: an existing row (or one a racing step is committing) makes
    # it a no-op, and the read after it sees that row, whatever the isolation level.
    async with store.begin() as conn:
        # The user's row, share-locked (segflowd.userlocks): a forget has committed (the
        # user is gone: nothing is stored) or waits for this commit and deletes the row.
        if await existing_users(conn, [user_id]):
            await conn.execute(store.insert_ignore(flow_splits).values(
                campaign=campaign, user_id=user_id, name=name, variant=variant,
                created_at=now))
        stored = (await conn.execute(sa.select(fs.variant).where(*key))).scalar()
    return str(stored) if stored is not None else variant


class _Row(Protocol):
    """A journal row, as far as :func:`latest_variant` reads it."""

    @property
    def kind(self) -> str: ...
    @property
    def result(self) -> object: ...


def latest_variant(journal: Iterable[_Row]) -> str | None:
    """The result of the journal's last ``split``: the variant the instance's sends carry."""
    variant = None
    for row in journal:
        if row.kind == "split" and isinstance(row.result, dict):
            value = row.result.get("value")
            if isinstance(value, str):
                variant = value
    return variant


class _Call(Protocol):
    """A scanned flow call (:class:`segflowd.cli.flowscan.FlowCall`)."""

    @property
    def command(self) -> str: ...
    @property
    def where(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def keywords(self) -> Mapping[str, object]: ...


def split_problems(calls: Iterable[_Call]) -> list[str]:
    """A problem per ``rt.split`` call whose literal weights are wrong (none above 0, a
    negative or non-number weight). A computed name or weights are not judged here."""
    out: list[str] = []
    for call in calls:
        name = call.name if call.name is not None else call.keywords.get("name")
        weights = call.keywords.get("weights")
        if call.command != "split" or name is None or weights is None:
            continue
        problem = weights_problem(name, weights)
        if problem is not None:
            out.append(f"{call.where}: rt.{problem}")
    return out
