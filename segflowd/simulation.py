"""``Simulation``: a campaign's whole life in milliseconds, from a plain (synchronous) test.

    from segflowd.testing import Simulation

    def test_winback():
        with Simulation("flows.py:app", start="2026-03-01T09:00:00Z") as sim:
            sim.user("ann", email="ann@example.com", name="Ann")
            sim.event("ann", "login", at="2026-01-01T00:00:00Z")
            sim.advance(days=5)
            assert [m.template for m in sim.sent("ann")][:1] == ["we-miss-you"]

The daemon's real engines (ingest's committer and routes, segments with their refresh
schedule, transactions, flows and their timer wheel, delivery's rendering) run on a
temporary SQLite store under a virtual clock; see :mod:`segflowd.simengine` for how.
What a caller may rely on:

* Every call returns once everything due at the simulation's current time has run: the
  user's segments are evaluated, flows have stepped, messages are rendered.
* :meth:`Simulation.advance` stops at each moment something is due (a wait ending, a
  segment's refresh) in time order; nothing sleeps on the wall clock.
* Times given (``start``, ``at``) are ISO 8601 strings or datetimes; naive means UTC.
  Times returned are naive UTC, to the millisecond.
* Bad input (an unknown user, a time in the simulation's future, attributes the HTTP API
  refuses) raises :class:`ValueError` with the API's own message; an app that does not
  load raises :class:`~segflowd.errors.AppError`, a bad config
  :class:`~segflowd.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .app import Segflow
from .config import Config, HttpKey, NamedTable, load_config
from .loader import load_app
from .simengine import API_KEY, Answer, SentMessage, SimEngine, TimelineEntry, moment

__all__ = ["Answer", "SentMessage", "Simulation", "TimelineEntry", "parse_time"]

PROVIDER = "simulation"  # the provider name delivery sends through (in memory)
SMS_PROVIDER = "simulation-sms"  # ... and SMS
DEFAULT_FROM = "Segflow Simulation <simulation@example.com>"  # [email] from, unless given
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8787"  # base of rendered links, unless given
LINK_SECRET = "simulation-link-key"  # signs tracking links, unless [email] secret is given
DEFAULTS: Mapping[str, Mapping[str, object]] = {
    "daemon": {"app": "simulation"},
    "email": {"from": DEFAULT_FROM},
    "http": {"public_url": DEFAULT_PUBLIC_URL},
}


class Simulation:
    """The engines of one app under a virtual clock; use it as a context manager.

    ``app`` is a :class:`~segflowd.Segflow` or a spec like ``"path/flows.py:app"``
    (relative to the working directory). ``start`` is the simulation's first moment.
    ``config`` is optional: a segflow.toml path, or a dict shaped like one
    (``{"email": {"from": ...}, "sources": {"crm": {"url": ...}}}``). Whatever it says,
    the store is a fresh temporary SQLite database and mail goes to memory.
    """

    def __init__(self, app: Segflow | str, start: dt.datetime | str,
                 config: Mapping[str, object] | str | Path | None = None) -> None:
        self.app = app if isinstance(app, Segflow) else load_app(app, Path.cwd())
        if isinstance(app, Segflow):
            app.validate()
        self.start = parse_time(start, "start")
        self._config_source = config
        self._folder: Path | None = None
        self._quieted = False  # structlog was configured quiet here (undone at close)
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._engine: SimEngine | None = None
        self._running: Future[None] | None = None
        self._users: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Simulation:
        self.open_store()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open_store(self) -> None:
        """Create the temporary store and start the engines (``with`` does this)."""
        if self._engine is not None:
            raise RuntimeError("this simulation is already running")
        self._folder = Path(tempfile.mkdtemp(prefix="segflow-sim-"))
        if not structlog.is_configured():
            # The engines log every step; a test reads the timeline instead. Only a
            # warning or worse is printed, unless the test configured logging itself.
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(
                logging.WARNING))
            self._quieted = True
        try:
            config = _config(self._config_source, self._folder)
            self._portal_cm = start_blocking_portal("asyncio")
            self._portal = portal = self._portal_cm.__enter__()
            self._engine = portal.call(SimEngine, self.app, config, self.start)
            self._running, _ = portal.start_task(self._engine.run, name="simulation")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the engines and delete the temporary store."""
        try:
            if self._portal is not None and self._engine is not None:
                if self._running is not None and not self._running.done():
                    self._portal.call(self._engine.stop)
                if self._running is not None:
                    self._running.result()
        finally:
            self._engine = self._running = None
            if self._portal_cm is not None:
                cm, self._portal_cm, self._portal = self._portal_cm, None, None
                cm.__exit__(None, None, None)
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None
            if self._quieted:
                structlog.reset_defaults()
                self._quieted = False

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        if self._portal is None or self._engine is None or self._running is None:
            raise RuntimeError("the simulation is not running: use `with Simulation(...) as sim:`")
        if self._running.done():
            self._running.result()  # the engines stopped: raise why
            raise RuntimeError("the simulation's engines have stopped")
        self._portal.call(fn, *args)

    @property
    def engine(self) -> SimEngine:
        if self._engine is None:
            raise RuntimeError("the simulation is not running: use `with Simulation(...) as sim:`")
        return self._engine

    # -- the scenario ----------------------------------------------------------------

    @property
    def now(self) -> dt.datetime:
        """The simulation's current time (naive UTC)."""
        return self.engine.clock.now()

    def user(self, user_id: str, **attributes: object) -> None:
        """Create the user or merge ``attributes`` into theirs (``None`` removes a key), as
        ``PUT /v1/users/{id}`` does; ``email`` is their address."""
        self._call(self.engine.put_user, user_id, attributes)
        self._users.add(user_id)

    def event(self, user_id: str, name: str, at: dt.datetime | str | None = None,
              **attributes: object) -> None:
        """The user's event ``name`` at ``at`` (default: now; never later than now), as
        ``POST /v1/users/{id}/events`` takes it."""
        self._known(user_id)
        when = None if at is None else parse_time(at, "at")
        if when is not None and when > self.now:
            raise ValueError(f"at: {when.isoformat()}Z is later than the simulation's "
                             f"clock ({self.now.isoformat()}Z); advance() first")
        self._call(self.engine.post_event, user_id, name, when, attributes)

    def subscriptions(self, user_id: str, *, all: bool | None = None,
                      topics: Mapping[str, bool] | None = None) -> None:
        """Change the user's topics, as ``PUT /v1/users/{id}/subscriptions`` (and the
        preference page) do: ``topics={"newsletter": False}`` leaves one topic,
        ``all=False`` all marketing mail; True subscribes again. ValueError for a topic
        the app does not define."""
        self._known(user_id)
        body: dict[str, object] = {}
        if all is not None:
            body["all"] = all
        if topics is not None:
            body["topics"] = dict(topics)
        self._call(self._put_subscriptions, user_id, body)

    async def _put_subscriptions(self, user_id: str, body: Mapping[str, object]) -> None:
        status, reply = await self.engine.call(
            "PUT", f"/v1/users/{quote(user_id, safe='')}/subscriptions", body)
        if status >= 400:
            error = reply.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            raise ValueError(f"subscriptions of user {user_id!r}: "
                             f"{message or f'HTTP {status}'}")

    def advance(self, *, days: float = 0, hours: float = 0, minutes: float = 0,
                seconds: float = 0) -> None:
        """Move the clock on; everything due on the way runs at its time, in order."""
        total = days * 86400 + hours * 3600 + minutes * 60 + seconds
        if not total >= 0:
            raise ValueError(f"advance() needs a positive duration, not {total} seconds")
        self._call(self.engine.advance, float(total))

    def source(self, name: str, answer: Answer) -> None:
        """Answer ``rt.condition(name, sql, **params)`` with ``answer(sql, params)``: a
        bool, a row with a ``result`` column, or None (no row: False)."""
        if not callable(answer):
            raise TypeError(f"source({name!r}): the answer must be a callable (sql, params)")
        self.engine.answers[name] = answer

    def open(self, message: SentMessage) -> None:
        """The recipient opens ``message`` (its open pixel is fetched): ``rt.opened``."""
        self._call(self.engine.engage, "o", message.id, None)

    def click(self, message: SentMessage, url: str) -> None:
        """The recipient follows ``url`` in ``message`` (a tracked click): ``rt.clicked``."""
        self._call(self.engine.engage, "c", message.id, url)

    # -- what happened ---------------------------------------------------------------

    def sent(self, user_id: str | None = None) -> list[SentMessage]:
        """The messages rendered and handed to the provider (of one user), in order."""
        if user_id is not None:
            self._known(user_id)
        return [m for m in self.engine.sent if user_id is None or m.user_id == user_id]

    def timeline(self, user_id: str | None = None) -> list[TimelineEntry]:
        """What happened to the user (to everyone, without one), in order."""
        if user_id is not None:
            self._known(user_id)
        return [e for e in self.engine.timeline if user_id is None or e.user_id == user_id]

    def _known(self, user_id: str) -> None:
        if user_id not in self._users:
            known = ", ".join(repr(u) for u in sorted(self._users)) or "none yet"
            raise ValueError(f"unknown user {user_id!r} (users: {known}); "
                             f"create it with sim.user({user_id!r}, ...) first")


def parse_time(value: dt.datetime | str, what: str) -> dt.datetime:
    """``value`` as naive UTC: an ISO 8601 string (``Z`` or an offset; none is UTC) or a
    datetime; :class:`ValueError` naming ``what`` otherwise."""
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            value = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{what}: not an ISO 8601 time: {value!r} "
                             "(e.g. 2026-03-01T09:00:00Z)") from None
    if not isinstance(value, dt.datetime):
        raise ValueError(f"{what}: expected a datetime or an ISO 8601 string, "
                         f"not {type(value).__name__}")
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return moment(value)


def _config(source: Mapping[str, object] | str | Path | None, folder: Path) -> Config:
    """The simulation's config: the given one (or defaults), on a store in ``folder``,
    sending through the in-memory provider."""
    if source is None or isinstance(source, Mapping):
        data = _merge(DEFAULTS, source or {})
        path = folder / "segflow.toml"
        path.write_text(_toml(data), encoding="utf-8")
        config = load_config(path)
    else:
        config = load_config(source)
    email = config.email
    if not email.secret:
        email = dataclasses.replace(email, secret=LINK_SECRET)
    http = dataclasses.replace(config.http, keys=(HttpKey(API_KEY, API_KEY),),
                               public_url=config.http.public_url or DEFAULT_PUBLIC_URL)
    return dataclasses.replace(
        config, store=dataclasses.replace(
            config.store, url=f"sqlite+aiosqlite:///{folder / 'simulation.db'}"),
        email=dataclasses.replace(email, provider=PROVIDER, provider_marketing=""), http=http,
        sms=dataclasses.replace(config.sms, provider=SMS_PROVIDER),
        providers={PROVIDER: NamedTable(PROVIDER, {"plugin": PROVIDER}),
                   SMS_PROVIDER: NamedTable(SMS_PROVIDER, {"plugin": SMS_PROVIDER})})


def _merge(base: Mapping[str, object], over: Mapping[str, object]) -> dict[str, object]:
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def _toml(data: Mapping[str, object], prefix: str = "") -> str:
    """``data`` as TOML (tables, arrays of tables, strings, numbers, booleans, arrays)."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in data.items():
        name = f"{prefix}{json.dumps(str(key))}"
        if isinstance(value, Mapping):
            tables.append(f"[{name}]\n" + _toml(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            tables += [f"[[{name}]]\n" + _toml(v, name + ".") for v in value]
        else:
            lines.append(f"{json.dumps(str(key))} = {_value(value, name)}")
    return "\n".join(lines + tables) + "\n"


def _value(value: object, name: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    if isinstance(value, os.PathLike):
        return json.dumps(os.fspath(value))
    if isinstance(value, list):
        return "[" + ", ".join(_value(v, name) for v in value) + "]"
    raise ValueError(f"config: {name} = {value!r} cannot be written to TOML")
