"""The public API a team writes its app with: ``Segflow``, its registrations, ``ago``.

Registration checks what it can at once (duplicate names, bad options) and raises
:class:`~segflowd.errors.AppError` pointing at the caller's file and line.
Cross-references (a campaign naming a segment defined further down) are checked by
:meth:`Segflow.validate`, which the loader calls once the module has run.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as dt
import hashlib
import inspect
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import BindParameter

from .appcraft import Goal, TopicDef, campaign_options, parse_interval, parse_topic_name
from .errors import AppError
from .localtime import Window
from .sourcedefs import (
    AUDIENCE_SQL,
    AudienceDef,
    DataSourceDef,
    check_definitions,
    parse_query,
)

__all__ = [
    "Ago",
    "CampaignDef",
    "Segflow",
    "SegmentDef",
    "SmsTemplateDef",
    "TemplateDef",
    "TransactionDef",
    "ago",
    "evaluating_at",
    "parse_interval",
]

DEFAULT_REFRESH = 3600.0  # seconds: segments that only change with time still get recomputed
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

Behavior = Literal["static", "dynamic"]
OnPause = Literal["hold", "skip"]
FlowFn = Callable[..., Generator[object, object, object]]
SegmentFn = Callable[[], Select[tuple[str]]]
F = TypeVar("F", bound=Callable[..., object])


# The "now" a segment is being evaluated at; the engines set it from the injected clock.
_EVALUATION_TIME: contextvars.ContextVar[dt.datetime | None] = contextvars.ContextVar(
    "segflow_evaluation_time", default=None)


@contextlib.contextmanager
def evaluating_at(now: dt.datetime) -> Iterator[None]:
    """Within this block, every :class:`Ago` in a query executed binds ``now - delta``."""
    token = _EVALUATION_TIME.set(now)
    try:
        yield
    finally:
        _EVALUATION_TIME.reset(token)


@dataclasses.dataclass(frozen=True)
class Ago:
    """A time ``delta`` before "now", computed at each execution of the query that binds it.

    Use it as a value in a Core expression (``users.c.created_at >= ago(days=7)``) or in
    ``params=`` of a raw-SQL segment; it is always a bound parameter, never text.
    """

    delta: dt.timedelta

    def resolve(self, now: dt.datetime | None = None) -> dt.datetime:
        if now is None:
            now = _EVALUATION_TIME.get() or dt.datetime.now(dt.UTC).replace(tzinfo=None)
        return now - self.delta

    def __clause_element__(self) -> BindParameter[dt.datetime]:
        return sa.bindparam(None, callable_=self.resolve, type_=sa.DateTime())


def ago(*, days: float = 0, hours: float = 0, minutes: float = 0, seconds: float = 0) -> Ago:
    """A bind parameter meaning "this long before now", re-evaluated every time a segment runs."""
    delta = dt.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if delta <= dt.timedelta(0):
        raise AppError("ago() needs a positive duration")
    return Ago(delta)


@dataclasses.dataclass(frozen=True)
class Origin:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True)
class SegmentDef:
    """A segment: a Core select of user ids (``query``) or raw SQL with named params."""

    name: str
    query: SegmentFn | None
    sql: str | None
    params: Mapping[str, object]
    refresh: float
    origin: Origin


@dataclasses.dataclass(frozen=True)
class CampaignDef:
    name: str
    flow: FlowFn
    segments: tuple[str, ...]
    exclude: tuple[str, ...]
    behavior: Behavior
    reentry: bool
    origin: Origin
    track: bool | None = None  # open/click tracking of its messages; None: the template's
    # "hold": who would have entered while it was paused enters on resume; "skip": never
    on_pause: OnPause = "hold"
    send_window: Window | None = None  # its sends wait for this local time (delivery gate)
    topic: str | None = None  # what its users opt out of (app.topic); None: marketing only
    goal: Goal | None = None  # the event that converts, and within how long of a message
    exit_on_goal: bool = False  # a conversion ends the user's instance

    @property
    def version(self) -> str:
        """A hash of the flow's code: a changed flow is a new version."""
        try:
            source = inspect.getsource(self.flow)
        except (OSError, TypeError):
            source = self.flow.__code__.co_code.hex()
        return hashlib.sha256(source.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class TemplateDef:
    name: str
    subject: str
    html: str  # a file name in the templates folder
    text: str | None
    origin: Origin
    track: bool | None = None  # open/click tracking; None: the campaign's or [email] track


@dataclasses.dataclass(frozen=True)
class SmsTemplateDef:
    name: str
    text: str  # the Jinja2 source: given inline, or read from file= at definition
    origin: Origin
    file: str | None = None  # the file in the templates folder it came from, if any


@dataclasses.dataclass(frozen=True)
class TransactionDef:
    name: str
    event: str
    template: str
    origin: Origin


def _caller(depth: int = 2) -> Origin:
    frame = inspect.stack()[depth]
    return Origin(frame.filename, frame.lineno)


def _check_name(kind: str, name: object, origin: Origin) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise AppError(
            f"{origin}: {kind} name {name!r} is invalid: use letters, digits, '-', '_', '.'"
        )
    return name


class Segflow:
    """A Segflow app: segments, campaigns, templates and transactions.

    ``templates`` is the folder of Jinja2 templates, relative to the file that creates
    the app.
    """

    def __init__(self, templates: str | Path = "templates") -> None:
        origin = _caller()
        base = Path(origin.file).resolve().parent
        t = Path(templates)
        self.templates_dir: Path = t if t.is_absolute() else base / t
        self.origin = origin
        self.segments: dict[str, SegmentDef] = {}
        self.campaigns: dict[str, CampaignDef] = {}
        self.templates: dict[str, TemplateDef] = {}
        self.sms_templates: dict[str, SmsTemplateDef] = {}
        self.transactions: dict[str, TransactionDef] = {}
        self.data_sources: dict[str, DataSourceDef] = {}
        self.audiences: dict[str, AudienceDef] = {}  # audience segments, by segment name
        self.topics: dict[str, TopicDef] = {}  # what users can opt out of, one by one

    # -- registration -----------------------------------------------------------------

    def segment(
        self, name: str, *, sql: str | None = None, params: Mapping[str, object] | None = None,
        refresh: str | float | None = None,
    ) -> Callable[[SegmentFn], SegmentFn]:
        """Register a segment.

        As a decorator, the function returns a SQLAlchemy Core select of user ids.
        Called with ``sql=``, the raw SQL selects a column ``id`` and may use named
        bound parameters from ``params`` (an :func:`ago` is computed at each evaluation).
        """
        origin = _caller()
        _check_name("segment", name, origin)
        if name in self.segments:
            raise AppError(f"{origin}: segment {name!r} is already defined at "
                           f"{self.segments[name].origin}")
        try:
            interval = parse_interval(refresh) if refresh is not None else DEFAULT_REFRESH
        except AppError as exc:
            raise AppError(f"{origin}: segment {name!r}: {exc}") from None
        if params and sql is None:
            raise AppError(f"{origin}: segment {name!r}: params= only goes with sql=")

        def register(fn: SegmentFn | None) -> None:
            self.segments[name] = SegmentDef(
                name=name, query=fn, sql=sql, params=dict(params or {}), refresh=interval,
                origin=origin,
            )

        if sql is not None:
            if not isinstance(sql, str) or not sql.strip():
                raise AppError(f"{origin}: segment {name!r}: sql= must be a non-empty string")
            register(None)

            def refuse(fn: SegmentFn) -> SegmentFn:
                raise AppError(f"{origin}: segment {name!r} has sql=; it takes no function")

            return refuse

        def decorator(fn: SegmentFn) -> SegmentFn:
            if not callable(fn):
                raise AppError(f"{origin}: segment {name!r} decorates a non-callable")
            register(fn)
            return fn

        return decorator

    def campaign(
        self, name: str, *, segments: Iterable[str], exclude: Iterable[str] = (),
        behavior: Behavior = "static", reentry: bool = False, track: bool | None = None,
        on_pause: OnPause = "hold", send_window: tuple[str, ...] | None = None,
        topic: str | None = None, goal: tuple[str, str | float] | None = None,
        exit_on_goal: bool = False,
    ) -> Callable[[F], F]:
        """Register a campaign: a generator function ``(ctx, rt)`` that yields commands.

        A user enters when in every segment of ``segments`` and in none of ``exclude``.
        ``static`` keeps them in the flow to its end; ``dynamic`` ends the flow when they
        stop matching. ``reentry=True`` lets a static campaign run again for a user.
        ``on_pause="hold"`` (the default) enters, on resume, those who would have entered
        while the campaign was paused; ``"skip"`` lets them pass, as if never matched.
        ``send_window=("09:00", "18:00", "mon-fri")`` holds each of its sends until the
        user's local time is inside the window (their ``timezone``, else the default).
        ``topic="newsletter"`` (an :meth:`topic`) lets users opt out of its messages
        alone. ``goal=("purchase", "7d")``: a ``purchase`` within 7 days of one of its
        messages converts, attributed to the latest; ``exit_on_goal=True`` then ends the
        user's flow.
        """
        origin = _caller()
        _check_name("campaign", name, origin)
        if name in self.campaigns:
            raise AppError(f"{origin}: campaign {name!r} is already defined at "
                           f"{self.campaigns[name].origin}")
        if isinstance(segments, str) or isinstance(exclude, str):
            raise AppError(f"{origin}: campaign {name!r}: segments= and exclude= take lists")
        segs, excl = tuple(segments), tuple(exclude)
        if not segs:
            raise AppError(f"{origin}: campaign {name!r}: segments= must name at least one")
        try:
            opts = campaign_options(behavior=behavior, on_pause=on_pause,
                                    send_window=send_window, topic=topic, goal=goal,
                                    exit_on_goal=exit_on_goal)
        except (ValueError, AppError) as exc:
            raise AppError(f"{origin}: campaign {name!r}: {exc}") from None

        def decorator(fn: F) -> F:
            if not inspect.isgeneratorfunction(fn):
                raise AppError(f"{origin}: campaign {name!r} must be a generator function "
                               "(it yields rt.send_email(...), rt.wait(...), ...)")
            self.campaigns[name] = CampaignDef(
                name=name, flow=fn, segments=segs, exclude=excl,
                reentry=reentry, origin=origin, track=track, **opts,
            )
            return fn  # type: ignore[return-value]  # mypy narrows F to the generator type

        return decorator

    def template(
        self, name: str, *, subject: str, html: str, text: str | None = None,
        track: bool | None = None,
    ) -> TemplateDef:
        """Register an email template: a subject template and an HTML file (Jinja2).

        ``track=True`` adds an open pixel and click redirects to its messages (``None``
        follows the campaign's ``track=`` and then ``[email] track``).
        """
        origin = _caller()
        self._new_template(name, origin)
        if not isinstance(subject, str) or not subject.strip():
            raise AppError(f"{origin}: template {name!r}: subject= must be a non-empty string")
        if not isinstance(html, str) or not html:
            raise AppError(f"{origin}: template {name!r}: html= must name a template file")
        t = TemplateDef(name=name, subject=subject, html=html, text=text, origin=origin,
                        track=track)
        self.templates[name] = t
        return t

    def sms_template(self, name: str, *, text: str | None = None,
                     file: str | None = None) -> SmsTemplateDef:
        """Register an SMS template: Jinja2 text, given inline (``text=``) or as a file
        in the templates folder (``file="reminder.txt"``). Email and SMS templates share
        one namespace, so a transaction's ``template=`` names either."""
        origin = _caller()
        self._new_template(name, origin)
        if (text is None) == (file is None):
            raise AppError(f"{origin}: SMS template {name!r}: give text= or file=, one of them")
        if file is not None:
            path = self.templates_dir / file
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise AppError(f"{origin}: SMS template {name!r}: cannot read {path}: "
                               f"{exc}") from None
        if not isinstance(text, str) or not text.strip():
            raise AppError(f"{origin}: SMS template {name!r}: the text is empty")
        t = SmsTemplateDef(name=name, text=text, origin=origin, file=file)
        self.sms_templates[name] = t
        return t

    def _new_template(self, name: str, origin: Origin) -> None:
        _check_name("template", name, origin)
        other = self.templates.get(name) or self.sms_templates.get(name)
        if other is not None:
            raise AppError(f"{origin}: template {name!r} is already defined at {other.origin}")

    def transaction(self, name: str, *, event: str, template: str) -> TransactionDef:
        """Register a transaction: each ``event`` sends ``template`` (email or SMS) to its
        user at once."""
        origin = _caller()
        _check_name("transaction", name, origin)
        if name in self.transactions:
            raise AppError(f"{origin}: transaction {name!r} is already defined at "
                           f"{self.transactions[name].origin}")
        if not isinstance(event, str) or not event:
            raise AppError(f"{origin}: transaction {name!r}: event= must be an event name")
        t = TransactionDef(name=name, event=event, template=template, origin=origin)
        self.transactions[name] = t
        return t

    # -- data sources (DirectFlow) ----------------------------------------------------

    def data_source(self, name: str, *, source: str, audience: str,
                    discovery: str | None = None, preload: str | None = None) -> DataSourceDef:
        """Register a DirectFlow data source: SQL on the customer database ``source``.

        ``audience`` returns ``profile_id`` plus ``email``/``phone``; ``discovery`` lists
        the audiences to choose from; ``preload`` gives per-profile template data
        (``profile``). ``<%= name %>`` placeholders are always bound parameters.
        """
        origin = _caller()
        _check_name("data source", name, origin)
        if name in self.data_sources:
            raise AppError(f"{origin}: data source {name!r} is already defined at "
                           f"{self.data_sources[name].origin}")
        if not isinstance(source, str) or not source:
            raise AppError(f"{origin}: data source {name!r}: source= must name a "
                           "[sources.NAME] table")
        try:
            d = DataSourceDef(
                name=name, source=source, audience=parse_query("audience", name, audience,
                                                               str(origin)),
                discovery=None if discovery is None else parse_query(
                    "discovery", name, discovery, str(origin)),
                preload=None if preload is None else parse_query(
                    "preload", name, preload, str(origin)),
                origin=str(origin))
        except ValueError as exc:
            raise AppError(str(exc)) from None
        self.data_sources[name] = d
        return d

    def audience_segment(self, name: str, *, data_source: str,
                         values: Mapping[str, object] | None = None,
                         refresh: str | float | None = None) -> AudienceDef:
        """A segment whose members are a data source's audience for ``values``.

        Its profiles are synced into users every ``refresh`` (default: hourly); a
        campaign names it in ``segments=`` like any segment, and entries and exits flow
        exactly as for SQL segments.
        """
        origin = _caller()
        _check_name("segment", name, origin)
        if name in self.segments:
            raise AppError(f"{origin}: segment {name!r} is already defined at "
                           f"{self.segments[name].origin}")
        if values is not None and not isinstance(values, Mapping):
            raise AppError(f"{origin}: audience segment {name!r}: values= must be a dict")
        try:
            interval = parse_interval(refresh) if refresh is not None else DEFAULT_REFRESH
        except AppError as exc:
            raise AppError(f"{origin}: segment {name!r}: {exc}") from None
        self.segments[name] = SegmentDef(
            name=name, query=None, sql=AUDIENCE_SQL, params={"audience": name},
            refresh=interval, origin=origin)
        a = AudienceDef(name=name, data_source=data_source, values=dict(values or {}),
                        refresh=interval, origin=str(origin))
        self.audiences[name] = a
        return a

    def topic(self, name: str, *, title: str | None = None, description: str = "") -> TopicDef:
        """Register a topic users can opt out of on their preference page (campaigns and
        broadcasts name it with ``topic=``); "unsubscribe from all" covers every topic."""
        origin = _caller()
        try:
            parse_topic_name(name)
        except ValueError as exc:
            raise AppError(f"{origin}: {exc}") from None
        if name in self.topics:
            raise AppError(f"{origin}: topic {name!r} is already defined at "
                           f"{self.topics[name].origin}")
        t = TopicDef(name=name, title=title or name, description=description,
                     origin=str(origin))
        self.topics[name] = t
        return t

    # -- validation -------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every cross-reference that does not resolve, one sentence each."""
        out: list[str] = []
        for c in self.campaigns.values():
            for seg in (*c.segments, *c.exclude):
                if seg not in self.segments:
                    out.append(f"{c.origin}: campaign {c.name!r} names unknown segment {seg!r}")
            if c.topic is not None and c.topic not in self.topics:
                out.append(f"{c.origin}: campaign {c.name!r} names unknown topic {c.topic!r} "
                           f"(topics: {', '.join(sorted(self.topics)) or 'none'})")
        for t in self.transactions.values():
            if t.template not in self.templates and t.template not in self.sms_templates:
                out.append(
                    f"{t.origin}: transaction {t.name!r} names unknown template {t.template!r}"
                )
        for tpl in self.templates.values():
            for f in (tpl.html, tpl.text):
                if f is not None and not (self.templates_dir / f).is_file():
                    out.append(f"{tpl.origin}: template {tpl.name!r}: file {f!r} not found in "
                               f"{self.templates_dir}")
        if self.data_sources or self.audiences:
            out.extend(check_definitions(self.data_sources, self.audiences))
        return out

    def validate(self) -> None:
        """Raise AppError listing every problem :meth:`problems` finds."""
        found = self.problems()
        if found:
            raise AppError("the app does not validate:\n  " + "\n  ".join(found))

    def transactions_for(self, event: str) -> list[TransactionDef]:
        return [t for t in self.transactions.values() if t.event == event]
