"""``rt.split``: argument checks with a sentence for each mistake, the hash's pick
(deterministic, following the weights, never a zero weight), the journal's latest
variant, and a replay that matches a split by its name whatever its weights."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from segflowd.errors import FlowError
from segflowd.flows.journal import JournalRow
from segflowd.flows.runtime import Command, Runtime
from segflowd.flows.split import latest_variant, pick

rt = Runtime(lambda name: True)
PEOPLE = [f"user-{i}" for i in range(2000)]


def test_a_split_is_a_command_with_its_weights_in_order() -> None:
    cmd = rt.split("subject-test", {"b": 1, "a": 2.5})
    assert cmd == Command("split", "subject-test", {"weights": {"b": 1, "a": 2.5}})
    assert list(cmd.args["weights"]) == ["b", "a"]  # type: ignore[call-overload]


def test_the_hash_names_the_split_not_its_weights() -> None:
    """Changing the weights must not make in-flight instances diverge on replay."""
    assert rt.split("t", {"a": 1, "b": 1}).hash == rt.split("t", {"a": 9, "c": 1}).hash
    assert rt.split("t", {"a": 1}).hash != rt.split("u", {"a": 1}).hash


@pytest.mark.parametrize(("name", "weights", "message"), [
    ("", {"a": 1}, "split() name must be a non-empty string of at most 191 characters"),
    ("x" * 192, {"a": 1}, "split() name must be a non-empty string"),
    (7, {"a": 1}, "split() name must be a non-empty string"),
    ("t", {}, "split('t') weights must be a dict of variant name to weight"),
    ("t", [("a", 1)], "split('t') weights must be a dict of variant name to weight"),
    ("t", {"": 1}, "split('t') variant names must be strings of 1 to 64 characters, not ''"),
    ("t", {"v" * 65: 1}, "split('t') variant names must be strings of 1 to 64"),
    ("t", {1: 1}, "split('t') variant names must be strings of 1 to 64 characters, not 1"),
    ("t", {"a": -1}, "split('t') weight of 'a' must be a finite number of at least 0, not -1"),
    ("t", {"a": True}, "split('t') weight of 'a' must be a finite number"),
    ("t", {"a": "50"}, "split('t') weight of 'a' must be a finite number"),
    ("t", {"a": math.inf}, "split('t') weight of 'a' must be a finite number"),
    ("t", {"a": math.nan}, "split('t') weight of 'a' must be a finite number"),
    ("t", {"a": 0, "b": 0.0}, "split('t') weights must sum to more than 0"),
])
def test_bad_arguments_are_a_flow_error_saying_what(name: object, weights: object,
                                                    message: str) -> None:
    with pytest.raises(FlowError) as info:
        rt.split(name, weights)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_a_pick_is_the_same_for_the_same_campaign_user_and_name() -> None:
    weights = {"a": 50.0, "b": 50.0}
    first = [pick("c", u, "t", weights) for u in PEOPLE[:200]]
    assert first == [pick("c", u, "t", weights) for u in PEOPLE[:200]]
    # Another experiment (or campaign) draws independently of this one.
    assert first != [pick("c", u, "other", weights) for u in PEOPLE[:200]]
    assert first != [pick("d", u, "t", weights) for u in PEOPLE[:200]]


@pytest.mark.parametrize(("weights", "bounds"), [
    ({"a": 50, "b": 50}, {"a": (0.45, 0.55), "b": (0.45, 0.55)}),
    ({"send": 90, "holdout": 10}, {"send": (0.87, 0.93), "holdout": (0.07, 0.13)}),
    ({"x": 1, "off": 0, "y": 1, "z": 2},
     {"x": (0.21, 0.29), "off": (0.0, 0.0), "y": (0.21, 0.29), "z": (0.45, 0.55)}),
])
def test_picks_over_two_thousand_users_follow_the_weights(
        weights: dict[str, float], bounds: dict[str, tuple[float, float]]) -> None:
    counts = Counter(pick("campaign", u, "experiment", weights) for u in PEOPLE)
    for variant, (low, high) in bounds.items():
        share = counts[variant] / len(PEOPLE)
        assert low <= share <= high, (variant, share)


def test_a_single_weighted_variant_takes_everyone() -> None:
    assert {pick("c", u, "t", {"off": 0, "on": 3, "never": 0}) for u in PEOPLE} == {"on"}


def test_the_latest_split_of_a_journal_is_the_variant() -> None:
    def row(seq: int, kind: str, result: object) -> JournalRow:
        return JournalRow(seq, kind, "t", "h", result, {})

    assert latest_variant([]) is None
    assert latest_variant([row(0, "send_email", {"value": None})]) is None
    journal = [row(0, "split", {"value": "a"}), row(1, "send_email", {"value": None}),
               row(2, "split", {"value": "holdout"}), row(3, "wait", None)]
    assert latest_variant(journal) == "holdout"
