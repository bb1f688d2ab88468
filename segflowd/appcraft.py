"""Campaign options for experiments, goals and topics (``Segflow.campaign(goal=, topic=)``,
``Segflow.topic()``): their definitions and the parsing that checks them at registration."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from .errors import AppError
from .localtime import parse_window

__all__ = ["MARKETING_TOPIC", "SMS_STOP_TOPIC", "Goal", "TopicDef", "campaign_options",
           "parse_goal", "parse_interval", "parse_topic_name"]

MARKETING_TOPIC = "marketing"  # the subscriptions topic "unsubscribe from all" turns off
SMS_STOP_TOPIC = "sms"  # the subscriptions topic an inbound STOP turns off
_TOPIC = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class Goal:
    """``goal=("purchase", "7d")``: the event that converts and how long after a message."""

    event: str
    window: float  # seconds

    def describe(self) -> str:
        return f"{self.event} within {self.window:g}s"


@dataclasses.dataclass(frozen=True)
class TopicDef:
    """``app.topic("newsletter", title="Newsletter")``: what a user can opt out of."""

    name: str
    title: str
    description: str
    origin: str  # file:line of the registration


def parse_goal(value: object) -> Goal:
    """``("purchase", "7d")`` (an event name and a window: seconds or '30m', '2d', '1w')."""
    if not (isinstance(value, tuple | list) and len(value) == 2
            and isinstance(value[0], str) and value[0].strip()):
        raise ValueError(f"goal must be (event name, window), e.g. ('purchase', '7d'), "
                         f"not {value!r}")
    window = value[1]
    if isinstance(window, bool) or not isinstance(window, str | int | float):
        raise ValueError(f"goal window must be seconds or e.g. '7d', not {window!r}")
    return Goal(event=value[0].strip(), window=parse_interval(window))


def parse_topic_name(value: object) -> str:
    """A topic name: lower-case letters, digits, '-', '_', '.' (it appears in URLs)."""
    if not isinstance(value, str) or not _TOPIC.match(value):
        raise ValueError(f"topic name {value!r} is invalid: use lower-case letters, digits, "
                         "'-', '_', '.' (at most 64)")
    if value == MARKETING_TOPIC:
        raise ValueError(f"topic name {MARKETING_TOPIC!r} is taken: it is 'unsubscribe "
                         "from all'")
    if value == SMS_STOP_TOPIC:
        raise ValueError(f"topic name {SMS_STOP_TOPIC!r} is taken: an inbound STOP turns it "
                         "off (all marketing SMS)")
    return value


MAX_INTERVAL = 100 * 366 * 86400.0  # seconds: the longest interval (a date must hold it)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_interval(value: str | float | int) -> float:
    """``"15m"``, ``"1h"``, ``"2d"``, ``"30s"`` or a number of seconds, as seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(value))
        if not m:
            raise AppError(f"bad interval {value!r}: write e.g. '30s', '15m', '1h', '2d'")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not seconds > 0:  # NaN too
        raise AppError(f"interval {value!r} must be positive")
    if seconds > MAX_INTERVAL:
        raise AppError(f"interval {value!r:.40} is longer than a hundred years")
    return seconds


def campaign_options(*, behavior: object, on_pause: object, send_window: object,
                     topic: object, goal: object, exit_on_goal: object) -> dict[str, Any]:
    """The checked ``Segflow.campaign()`` options as ``CampaignDef`` fields (ValueError or
    AppError naming the bad one)."""
    if behavior not in ("static", "dynamic"):
        raise ValueError(f"behavior must be 'static' or 'dynamic', not {behavior!r}")
    if on_pause not in ("hold", "skip"):
        raise ValueError(f"on_pause must be 'hold' or 'skip', not {on_pause!r}")
    try:
        window = None if send_window is None else parse_window(send_window)
    except ValueError as exc:
        raise ValueError(f"send_window: {exc}") from None
    aim = None if goal is None else parse_goal(goal)
    if exit_on_goal and aim is None:
        raise ValueError("exit_on_goal=True needs a goal=")
    return {"behavior": behavior, "on_pause": on_pause, "send_window": window,
            "topic": None if topic is None else parse_topic_name(topic), "goal": aim,
            "exit_on_goal": bool(exit_on_goal)}
