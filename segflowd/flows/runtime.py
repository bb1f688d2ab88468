"""What a flow sees: ``rt`` (the commands it yields) and ``ctx`` (its recorded reads).

A flow never performs effects: ``rt.send_email("welcome")`` only *describes* a send as a
:class:`Command`; the flow service journals it and carries it out. Everything a flow
reads of ``ctx`` between two yields is recorded (``reads``) so that a replay can answer
the same reads with the same values even after the user's data changed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import json as _json  # rt.webhook's ``json`` argument shadows the module
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

from ..app import parse_interval
from ..errors import FlowError, WebhookFailed
from ..localtime import check_local_wait
from .split import weights_problem

__all__ = ["Command", "CommandKind", "Context", "FlowEvent", "Runtime", "WebhookFailed",
           "WebhookResponse", "args_hash", "flow_error"]

CommandKind = Literal["send_email", "send_sms", "wait", "wait_until", "wait_for_event", "condition",
                      "opened", "clicked", "exit", "continue_as_new", "webhook",
                      "wait_until_local", "split"]
# Commands after which the instance waits; a webhook waits for its call's final outcome.
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP header name (RFC 9110 token)
WAIT_KINDS = frozenset({"wait", "wait_until", "wait_for_event", "webhook", "wait_until_local"})
WEBHOOK_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
MAX_WEBHOOK_TIMEOUT = 60.0  # seconds: the longest one attempt of rt.webhook() may take

# A read's key ("user.plan", "user", "event", "patched.x") and its answer: the value as
# JSON, with ``present`` False for a missing key (``.get`` returns the default).
ReadAnswer = Callable[[str], tuple[bool, object]]


HASH_CACHE = 4096  # argument hashes remembered (commands with scalar arguments only)
_hashes: dict[tuple[object, ...], str] = {}
# Scalar types whose (type, repr) pins down their JSON spelling: 1, 1.0 and True are equal
# as dict keys but hash differently, and so do 0.0 and -0.0.
_SCALARS = (str, int, float, bool, type(None))


def args_hash(kind: str, name: str | None, args: Mapping[str, object]) -> str:
    """A stable hash of a command's arguments: replay compares it, never the arguments."""
    parts: list[object] = [kind, name]
    for k, v in args.items():
        if type(v) not in _SCALARS:
            break
        parts += (k, type(v), repr(v))
    key = tuple(parts) if len(parts) == 2 + 3 * len(args) else None
    if key is not None:
        found = _hashes.get(key)
        if found is not None:
            return found
    blob = json.dumps([kind, name, args], sort_keys=True, default=str, separators=(",", ":"))
    digest = hashlib.sha256(blob.encode()).hexdigest()[:32]
    if key is not None:
        if len(_hashes) >= HASH_CACHE:
            _hashes.clear()
        _hashes[key] = digest
    return digest


@dataclasses.dataclass(frozen=True)
class Command:
    """One yielded command. ``args`` is JSON-able; ``name`` is the template/event/source."""

    kind: CommandKind
    name: str | None = None
    args: Mapping[str, object] = dataclasses.field(default_factory=dict)

    @property
    def hash(self) -> str:
        # A split's weights may change while instances are in flight (they only steer
        # users not yet assigned): replay matches a split by its name alone.
        return args_hash(self.kind, self.name, {} if self.kind == "split" else self.args)

    def describe(self) -> str:
        return f"{self.kind}({self.name!r})" if self.name is not None else f"{self.kind}()"


@dataclasses.dataclass(frozen=True)
class FlowEvent:
    """An event as a flow sees it (``ctx.event``, the result of ``wait_for_event``)."""

    id: int
    name: str
    attributes: Mapping[str, object]
    created_at: str  # ISO 8601, naive UTC

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "attributes": dict(self.attributes),
                "created_at": self.created_at}

    @classmethod
    def from_json(cls, data: object) -> FlowEvent | None:
        if not isinstance(data, dict):
            return None
        return cls(int(data["id"]), str(data["name"]), dict(data.get("attributes") or {}),
                   str(data["created_at"]))


@dataclasses.dataclass(frozen=True)
class WebhookResponse:
    """What ``yield rt.webhook(...)`` returns: the answer as journaled (any status but a
    5xx or 429, 4xx included). ``json`` is None when the body was not JSON or was over
    ``[webhooks] max_body`` (``truncated``); ``headers`` have lower-case names."""

    status: int
    json: object
    headers: Mapping[str, str]
    truncated: bool = False

    @classmethod
    def from_json(cls, data: object) -> WebhookResponse | None:
        if not isinstance(data, dict):
            return None
        headers = data.get("headers")
        return cls(int(data.get("status") or 0), data.get("json"),
                   dict(headers) if isinstance(headers, dict) else {},
                   bool(data.get("truncated")))


def flow_error(kind: str | None, message: str) -> FlowError:
    """The exception a journaled error of a ``kind`` command is thrown into the flow as."""
    return WebhookFailed(message) if kind == "webhook" else FlowError(message)


# The longest a wait may be: a wake time must stay inside what every store's DATETIME holds
# (and a timedelta can add), whenever the wait starts.
MAX_WAIT = 100 * 366 * 86400.0  # seconds: a hundred years
LATEST_WAKE = dt.datetime(9000, 1, 1)  # wait_until() beyond this is refused


def _seconds(value: object, what: str) -> float:
    if isinstance(value, dt.timedelta):
        return _duration(value.total_seconds(), what)
    if isinstance(value, str | int | float):
        return _duration(parse_interval(value), what)
    raise FlowError(f"{what} must be a number of seconds, a timedelta or '2d', not {value!r}")


def _duration(total: float, what: str) -> float:
    """``total`` seconds, if a wait can be that long (finite, 0 to :data:`MAX_WAIT`)."""
    if not math.isfinite(total) or total < 0:
        raise FlowError(f"{what} needs a finite, positive duration, not {total} seconds")
    if total > MAX_WAIT:
        raise FlowError(f"{what} of {total:.0f} seconds is longer than the longest wait "
                        f"({MAX_WAIT:.0f} seconds, a hundred years)")
    return total


class Runtime:
    """``rt``: builds the commands a flow yields. Every method returns a :class:`Command`."""

    def __init__(self, patched: Callable[[str], bool]) -> None:
        self._patched = patched

    def send_email(self, template: str, **data: object) -> Command:
        """Send ``template`` to the user; ``data`` joins the template context. Result: None."""
        try:
            json.dumps(data)
        except (TypeError, ValueError) as exc:
            raise FlowError(f"send_email({template!r}) data must be JSON-able: {exc}") from None
        return Command("send_email", template, dict(data))

    def send_sms(self, template: str, **data: object) -> Command:
        """Send the SMS ``template`` to the user's ``phone``; ``data`` joins the template
        context. Result: None (delivery goes on without the flow, as for email)."""
        try:
            json.dumps(data)
        except (TypeError, ValueError) as exc:
            raise FlowError(f"send_sms({template!r}) data must be JSON-able: {exc}") from None
        return Command("send_sms", template, dict(data))

    def wait(self, *, days: float = 0, hours: float = 0, minutes: float = 0,
             seconds: float = 0) -> Command:
        """Sleep this long (durably: a restart does not shorten or repeat it)."""
        try:
            total = float(days * 86400 + hours * 3600 + minutes * 60 + seconds)
        except (TypeError, OverflowError):
            raise FlowError(f"wait() takes numbers: days={days!r}, hours={hours!r}, "
                            f"minutes={minutes!r}, seconds={seconds!r}") from None
        return Command("wait", None, {"seconds": _duration(total, "wait()")})

    def wait_until(self, when: dt.datetime) -> Command:
        """Sleep until ``when`` (naive UTC, or aware: converted to UTC)."""
        if not isinstance(when, dt.datetime):
            raise FlowError(f"wait_until() takes a datetime, not {when!r}")
        if when.tzinfo is not None:
            when = when.astimezone(dt.UTC).replace(tzinfo=None)
        if when >= LATEST_WAKE:
            raise FlowError(f"wait_until({when.isoformat()}) is later than the latest wake "
                            f"time a store holds ({LATEST_WAKE.isoformat()})")
        return Command("wait_until", None, {"at": when.isoformat()})

    def wait_until_local(self, hour: int, minute: int = 0, weekdays: str | None = None,
                         timezone: str | None = None) -> Command:
        """Sleep until the next ``hour:minute`` (on ``weekdays``, e.g. "mon-fri") on the
        user's wall clock: their ``timezone`` attribute, else ``[daemon] default_timezone``
        (``timezone=`` names one instead). The wake time is decided once, when the step
        runs, and journaled: a replay or a later change of the user's zone keeps it."""
        try:
            check_local_wait(hour, minute, weekdays, timezone)
        except ValueError as exc:
            raise FlowError(f"wait_until_local(): {exc}") from None
        return Command("wait_until_local", None, {"hour": hour, "minute": minute,
                                                  "weekdays": weekdays, "timezone": timezone})

    def wait_for_event(self, name: str, *, timeout: object = None) -> Command:
        """Wait for the user's next ``name`` event. Result: the event, or None on timeout."""
        t = None if timeout is None else _seconds(timeout, "wait_for_event timeout")
        return Command("wait_for_event", name, {"timeout": t})

    def condition(self, source: str, sql: str, **params: object) -> Command:
        """A DirectFlow condition on the customer database ``source``. Result: bool."""
        return Command("condition", source, {"sql": sql, "params": params})

    def opened(self, template: str) -> Command:
        """Whether the user opened a message of ``template``. Result: bool."""
        return Command("opened", template)

    def clicked(self, template: str) -> Command:
        """Whether the user clicked in a message of ``template``. Result: bool."""
        return Command("clicked", template)

    def webhook(self, url: str, method: str = "POST", json: object = None,
                headers: Mapping[str, str] | None = None, timeout: float = 10) -> Command:
        """Call ``url`` (durably, at least once, with ``Idempotency-Key``). Result: a
        :class:`WebhookResponse`; :class:`WebhookFailed` is thrown when it fails for good."""
        if not isinstance(url, str) or not url:
            raise FlowError(f"webhook() url must be a string, not {url!r}")
        verb = method.upper() if isinstance(method, str) else ""
        if verb not in WEBHOOK_METHODS:
            raise FlowError(f"webhook({url!r}) method must be one of "
                            f"{', '.join(sorted(WEBHOOK_METHODS))}, not {method!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
                0 < timeout <= MAX_WEBHOOK_TIMEOUT):
            raise FlowError(f"webhook({url!r}) timeout must be a number of seconds above 0 "
                            f"and at most {MAX_WEBHOOK_TIMEOUT:.0f}, not {timeout!r}")
        hdrs = dict(headers or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in hdrs.items()):
            raise FlowError(f"webhook({url!r}) headers must map strings to strings")
        for k, v in hdrs.items():  # what HTTP/1.1 can carry: no line break, ASCII only
            if not (_TOKEN.fullmatch(k) and v.isascii() and v.isprintable()):
                raise FlowError(f"webhook({url!r}) header {k!r}: a name of letters, digits "
                                "and -, and a value of printable ASCII without line breaks")
        args: dict[str, object] = {"method": verb, "json": json, "headers": hdrs,
                                   "timeout": float(timeout)}
        try:
            _json.dumps(args)
        except (TypeError, ValueError) as exc:
            raise FlowError(f"webhook({url!r}) json must be JSON-able: {exc}") from None
        return Command("webhook", url, args)

    def split(self, name: str, weights: Mapping[str, float]) -> Command:
        """Put the user in a variant of experiment ``name``, drawn by ``weights`` (variant
        name to a number at least 0, e.g. ``{"send": 90, "holdout": 10}``). Result: the
        variant (str). Decided once per campaign, user and name, and stored: later splits
        (new weights included) give that user the same variant."""
        problem = weights_problem(name, weights)
        if problem is not None:
            raise FlowError(problem)
        return Command("split", name, {"weights": dict(weights)})

    def exit(self) -> Command:
        """End the flow here."""
        return Command("exit")

    def continue_as_new(self, **state: object) -> Command:
        """End this instance (``completed``) and start the campaign over for the user as a
        new instance, in the same step, with ``state`` as its ``ctx.data``: a flow that
        loops for months keeps its journal (and its replay) short."""
        try:
            json.dumps(state)
        except (TypeError, ValueError) as exc:
            raise FlowError(f"continue_as_new() state must be JSON-able: {exc}") from None
        return Command("continue_as_new", None, dict(state))

    def patched(self, name: str) -> bool:
        """True on code paths added by change ``name``; False while replaying older journals.

        Not yielded: call it (``if rt.patched("shorter-wait"): ...``). It is recorded like a
        ``ctx`` read, so an instance that started before the change keeps its old path.
        """
        return self._patched(name)


class _RecordingMapping(Mapping[str, object]):
    """``ctx.user``: each key read is answered (and recorded) through ``answer``."""

    def __init__(self, prefix: str, answer: ReadAnswer) -> None:
        self._prefix = prefix
        self._answer = answer

    def __getitem__(self, key: str) -> object:
        present, value = self._answer(f"{self._prefix}.{key}")
        if not present:
            raise KeyError(key)
        return value

    def _whole(self) -> dict[str, object]:
        _, value = self._answer(self._prefix)
        return dict(value) if isinstance(value, dict) else {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._whole())

    def __len__(self) -> int:
        return len(self._whole())

    def __repr__(self) -> str:
        return f"ctx.{self._prefix}({self._whole()!r})"


class Context:
    """``ctx``: ``ctx.user`` (attributes), ``ctx.event`` (the entering event or None) and
    ``ctx.data`` (what a broadcast started the flow with; empty otherwise)."""

    def __init__(self, answer: ReadAnswer, user_id: str, campaign: str) -> None:
        self._answer = answer
        self.user_id = user_id
        self.campaign = campaign
        self.user: Mapping[str, object] = _RecordingMapping("user", answer)
        self.data: Mapping[str, object] = _RecordingMapping("data", answer)

    @property
    def event(self) -> FlowEvent | None:
        _, value = self._answer("event")
        return FlowEvent.from_json(value)
