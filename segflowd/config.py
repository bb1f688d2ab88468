"""segflow.toml: parsed with tomllib into typed, validated, frozen objects.

Rules a caller may rely on:

* The file is ``--config PATH``, else ``$SEGFLOW_CONFIG``, else ``./segflow.toml``.
* Every scalar key can be overridden by ``SEGFLOW_<SECTION>_<KEY>`` (for named tables:
  ``SEGFLOW_PROVIDERS_<NAME>_<KEY>``, ``SEGFLOW_SOURCES_<NAME>_<KEY>``).
* A key ``k`` may instead be given as ``k_env = "VAR"`` (read from the environment
  variable ``VAR``) or ``k_file = "PATH"`` (read from that file, less one trailing
  newline), so secrets stay out of the file; see :mod:`segflowd.configenv`.
* An error in a value that came from the environment names the variable, not the file.
* Relative paths (and relative SQLite database paths) are relative to the config file.
* Durations in ``[retention]`` are strings with a unit: ``"90d"``, ``"12h"``, ``"2w"``
  (``s``, ``m``, ``h``, ``d``, ``w``, as ``refresh=`` in the app); an age may instead
  be ``"forever"``, which keeps that kind of data for good.
* Anything wrong raises :class:`~segflowd.errors.ConfigError` naming file, key, line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
import zoneinfo
from collections.abc import Mapping
from pathlib import Path

from . import configcheck, configenv
from .configchannels import (
    SmsConfig,
    WebhooksConfig,
    check_sms,
    check_webhooks,
    parse_webhook_headers,
)
from .configmail import EmailConfig, check_email
from .dashboard import DashboardConfig, check_dashboard
from .errors import ConfigError

__all__ = [
    "Age",
    "Config",
    "DaemonConfig",
    "EmailConfig",
    "HttpConfig",
    "HttpKey",
    "NamedTable",
    "RetentionConfig",
    "StoreConfig",
    "default_config_path",
    "load_config",
]

DEFAULT_CONFIG = "segflow.toml"
DEFAULT_DRAIN = 10.0  # seconds
DEFAULT_LISTEN = "127.0.0.1:8787"
DEFAULT_STORE_URL = "sqlite+aiosqlite:///var/segflow.db"
DEFAULT_MAX_EVENT = 32 * 1024  # bytes
DEFAULT_MAX_REQUEST = 500 * 1024  # bytes
DEFAULT_STORE_RETRY_MAX = 30.0  # seconds between attempts to reach the store at start
DAY = 86400.0  # seconds
MIN_RETENTION = DAY  # seconds: nothing younger is ever pruned (see RetentionConfig)
MIN_RETENTION_INTERVAL = 60.0  # seconds between the starts of two prune passes, at least
MAX_RETENTION_BATCH = 10_000  # rows per prune statement, at most
FOREVER = "forever"  # the one spelling of "keep this kind of data for good"
KEY_SCOPES = ("all", "track", "app")  # [[http.keys]] scope (segflowd.ingest.auth)

_LOG_FORMATS = ("auto", "json", "console")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY, "w": 7 * DAY}
Age = typing.NewType("Age", float)  # seconds, written "90d"; `Age | None` takes "forever"


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    app: str
    control_socket: Path = Path("run/segflow.sock")
    control_socket_mode: int = 0o600
    control_socket_group: str = ""
    drain_timeout: float = DEFAULT_DRAIN
    log_format: str = "auto"
    log_level: str = "info"
    # The IANA time zone of users without a ``timezone`` attribute (SMS quiet hours).
    default_timezone: str = "UTC"


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    url: str = DEFAULT_STORE_URL
    pool_size: int = 10
    connect_timeout: float = 5.0  # seconds
    start_retry_max: float = DEFAULT_STORE_RETRY_MAX
    timeout: float = 5.0  # seconds: a statement's answer or a group commit, at most
    group_readable: bool = False  # a new SQLite file is 0640 (its group reads it), not 0600


@dataclasses.dataclass(frozen=True)
class HttpKey:
    name: str
    secret: str = dataclasses.field(repr=False)
    # What the key may do (segflowd.ingest.auth): "all", "track" (a browser's public
    # write key: tracking writes only) or "app" (the App API's send routes only).
    scope: str = "all"


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    listen: str = DEFAULT_LISTEN
    public_url: str = ""
    keys: tuple[HttpKey, ...] = ()
    max_event_bytes: int = DEFAULT_MAX_EVENT
    max_request_bytes: int = DEFAULT_MAX_REQUEST
    metrics_key: str = dataclasses.field(default="", repr=False)
    # Slow and idle clients (see segflowd.httpguard): seconds and counts.
    header_timeout: float = 10.0  # from connecting (or the request's first byte) to headers
    body_timeout: float = 30.0  # from the headers to the body's last byte
    keepalive_timeout: float = 5.0  # an idle kept-alive connection is closed after
    max_connections: int = 1000  # open at once (lowered under the open-files limit)
    max_header_bytes: int = 16 * 1024  # request line and headers (431 past it)
    max_headers: int = 100  # header lines (431 past it)
    # Origins whose browsers may call the tracking routes (CORS); "*": any (ingest/cors.py).
    cors_origins: tuple[str, ...] = ("*",)

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclasses.dataclass(frozen=True)
class RetentionConfig:
    """How long finished data is kept (seconds; None keeps it forever); see
    :mod:`segflowd.retention.rules` for what is never pruned whatever its age."""

    finished_instances: Age | None = Age(90 * DAY)  # ended instances and their journal
    segment_changes: Age | None = Age(90 * DAY)  # entries and exits, by ``at``
    messages: Age | None = Age(365 * DAY)  # finished messages and their opens/clicks
    events: Age | None = None  # segments are SQL over events: kept unless asked
    # After DELETE /v1/users/{id}: ingest refuses the id's events and identifies (409)
    # for this long, so a late or retried event does not bring the user back.
    forget_window: Age | None = Age(30 * DAY)
    interval: Age = Age(3600.0)  # between the starts of two prune passes
    batch_size: int = 1000  # rows per prune statement


@dataclasses.dataclass(frozen=True)
class NamedTable:
    """A ``[providers.NAME]`` or ``[sources.NAME]`` table: free-form options."""

    name: str
    options: Mapping[str, object]

    def get_str(self, key: str, default: str = "") -> str:
        value = self.options.get(key, default)
        return str(value)


@dataclasses.dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonConfig
    store: StoreConfig
    http: HttpConfig
    email: EmailConfig
    providers: Mapping[str, NamedTable]
    sources: Mapping[str, NamedTable]
    retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig)
    dashboard: DashboardConfig = dataclasses.field(default_factory=DashboardConfig)
    sms: SmsConfig = dataclasses.field(default_factory=SmsConfig)
    webhooks: WebhooksConfig = dataclasses.field(default_factory=WebhooksConfig)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, path: Path | str) -> Path:
        """A path from the config, made absolute against the config file's folder."""
        p = Path(path)
        return p if p.is_absolute() else (self.base_dir / p)


def default_config_path(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("SEGFLOW_CONFIG")
    return Path(env) if env else Path(DEFAULT_CONFIG)


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, validate; raise ConfigError on any fault."""
    cfg_path = default_config_path(str(path) if path is not None else None).absolute()
    env = os.environ if environ is None else environ
    fname = str(cfg_path)
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "configuration file not found (pass --config PATH or set SEGFLOW_CONFIG)",
            file=fname,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file: {exc}", file=fname) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line = int(m.group(1)) if m else None
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        if m:
            msg += f" (column {m.group(2)})"
        raise ConfigError(f"TOML syntax error: {msg}", file=fname, line=line) from None
    return _Parser(fname, text, env).parse(data, cfg_path)


_SECTIONS: dict[str, type] = {
    "daemon": DaemonConfig,
    "store": StoreConfig,
    "http": HttpConfig,
    "email": EmailConfig,
    "retention": RetentionConfig,
    "dashboard": DashboardConfig,
    "sms": SmsConfig,
    "webhooks": WebhooksConfig,
}
_NAMED = ("providers", "sources")


class _Parser:
    def __init__(self, fname: str, text: str, env: Mapping[str, str]) -> None:
        self.fname = fname
        self.lines = text.splitlines()
        self.env = env
        self.origins: dict[str, str] = {}  # dotted key -> the SEGFLOW_* variable that set it

    def error(self, key: str, message: str) -> ConfigError:
        var = self.origins.get(re.sub(r"\[\d+\]", "", key))
        if var is not None:  # the file is not where the value came from
            return ConfigError(message, file=f"environment variable {var}", key=key)
        return ConfigError(message, file=self.fname, key=key, line=self._line_of(key))

    def _line_of(self, dotted: str) -> int | None:
        """Best-effort line of ``section.key`` (or of the section header)."""
        parts = re.sub(r"\[\d+\]", "", dotted).split(".")
        section, key = ".".join(parts[:-1]), parts[-1]
        current = ""
        header_line = None
        for i, raw in enumerate(self.lines, start=1):
            line = raw.strip()
            h = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", line)
            if h:
                current = h.group(1).replace('"', "")
                if current == dotted:
                    return i
                if current == section and header_line is None:
                    header_line = i
                continue
            if current == section and re.match(rf'^"?{re.escape(key)}"?\s*=', line):
                return i
        return header_line

    def parse(self, data: dict[str, object], cfg_path: Path) -> Config:
        for key in data:
            if key not in _SECTIONS and key not in _NAMED:
                known = ", ".join(sorted([*_SECTIONS, *_NAMED]))
                raise self.error(key, f"unknown section [{key}] (known: {known})")
        sections: dict[str, object] = {}
        for name, cls in _SECTIONS.items():
            table = data.get(name, {})
            if not isinstance(table, dict):
                raise self.error(name, f"[{name}] must be a table")
            table = self._env_overrides(name, dict(table), cls)
            headers = table.pop("headers", {}) if name == "webhooks" else None
            sections[name] = self._build(cls, table, name)
            if headers:
                sections[name] = dataclasses.replace(
                    typing.cast(WebhooksConfig, sections[name]), headers=parse_webhook_headers(
                        headers, self._resolve_env_keys, self.error))
        named: dict[str, dict[str, NamedTable]] = {}
        for group in _NAMED:
            tables = data.get(group, {})
            if not isinstance(tables, dict):
                raise self.error(group, f"[{group}] must hold named tables like [{group}.NAME]")
            named[group] = {}
            for tname, table in tables.items():
                if not isinstance(table, dict):
                    raise self.error(f"{group}.{tname}", "must be a table")
                opts = self._env_named(group, tname, dict(table))
                resolved = self._resolve_env_keys(opts, f"{group}.{tname}")
                named[group][tname] = NamedTable(tname, resolved)
        email = typing.cast(EmailConfig, sections["email"])
        if email.provider == EmailConfig.provider and email.provider not in named["providers"]:
            # The embedded default needs no table: the file outbox with its defaults.
            named["providers"][email.provider] = NamedTable(email.provider,
                                                            {"plugin": email.provider})
        config = Config(
            path=cfg_path,
            daemon=typing.cast(DaemonConfig, sections["daemon"]),
            store=typing.cast(StoreConfig, sections["store"]),
            http=typing.cast(HttpConfig, sections["http"]),
            email=email,
            providers=named["providers"],
            sources=named["sources"],
            retention=typing.cast(RetentionConfig, sections["retention"]),
            dashboard=typing.cast(DashboardConfig, sections["dashboard"]),
            sms=typing.cast(SmsConfig, sections["sms"]),
            webhooks=typing.cast(WebhooksConfig, sections["webhooks"]),
        )
        self._validate(config)
        return _absolutize(config)

    # -- environment -------------------------------------------------------------------

    def _env_overrides(
        self, section: str, table: dict[str, object], cls: type,
    ) -> dict[str, object]:
        return configenv.section_overrides(self.env, section, cls, table, self.origins)

    def _env_named(self, group: str, name: str, table: dict[str, object]) -> dict[str, object]:
        return configenv.named_overrides(self.env, group, name, table, self.origins)

    def _resolve_env_keys(self, table: Mapping[str, object], where: str) -> dict[str, object]:
        """Replace every ``k_env`` and ``k_file`` by ``k`` with the value they point at."""
        return configenv.resolve_indirections(table, where, self.env,
                                              Path(self.fname).parent, self.error)

    # -- typed building ----------------------------------------------------------------

    def _build(self, cls: type, table: dict[str, object], where: str) -> object:
        table = self._resolve_env_keys(table, where)
        fields = {f.name.rstrip("_"): f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, object] = {}
        for key, value in table.items():
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise self.error(f"{where}.{key}", f"unknown key (known keys: {known})")
            f = fields[key]
            kwargs[f.name] = self._coerce(hints[f.name], value, f"{where}.{key}")
        for key, f in fields.items():
            missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if missing and f.name not in kwargs:
                raise self.error(f"{where}.{key}", "required key is missing")
        return cls(**kwargs)

    def _coerce(self, hint: object, value: object, key: str) -> object:
        from_env = isinstance(value, str)
        if hint is str:
            if not isinstance(value, str):
                raise self.error(key, f"must be a string, not {_tname(value)}")
            return value
        if hint is bool:
            if isinstance(value, bool):
                return value
            if from_env and str(value).lower() in (*_TRUE, *_FALSE):
                return str(value).lower() in _TRUE
            raise self.error(key, f"must be true or false, not {_tname(value)}")
        if hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value, 0)
                except ValueError:
                    pass
            raise self.error(key, f"must be an integer, not {_tname(value)}")
        if hint is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise self.error(key, f"must be a number, not {_tname(value)}")
        if hint is Age:
            return self._age(value, key, forever=False)
        if set(typing.get_args(hint)) == {Age, type(None)}:
            return self._age(value, key, forever=True)
        if hint is Path:
            if not isinstance(value, str) or not value:
                raise self.error(key, f"must be a path string, not {_tname(value)}")
            return Path(value)
        origin = typing.get_origin(hint)
        if origin is tuple:
            (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
            if item is str:
                return configenv.string_list(value, key, self.error)
            if not isinstance(value, list):
                raise self.error(key, f"must be an array of tables, not {_tname(value)}")
            out = []
            for i, entry in enumerate(value):
                if not isinstance(entry, dict):
                    raise self.error(f"{key}[{i}]", "must be a table")
                out.append(self._build(typing.cast(type, item), dict(entry), f"{key}[{i}]"))
            return tuple(out)
        if isinstance(hint, types.UnionType):  # pragma: no cover - no such fields yet
            raise self.error(key, "unsupported type")
        raise self.error(key, f"unsupported type {hint!r}")  # pragma: no cover

    def _age(self, value: object, key: str, *, forever: bool) -> Age | None:
        """A duration with a unit ("90d"); with ``forever``, "forever" too (None)."""
        spelled = '"90d", "12h" or "2w"' + (' (or "forever" to keep forever)' if forever else "")
        if not isinstance(value, str):  # 90 (days? seconds?) and 0 (never? at once?) are refused
            raise self.error(key, f"must be a duration with a unit like {spelled}, "
                                  f"not {_tname(value)}")
        text = value.strip()
        if forever and text == FOREVER:
            return None
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
        if not m:
            raise self.error(key, f"{value!r} is not a duration: write e.g. {spelled}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        if seconds <= 0:
            raise self.error(key, f"must be longer than 0: write e.g. {spelled}")
        return Age(seconds)

    # -- cross-field validation ------------------------------------------------------

    def _validate(self, c: Config) -> None:
        if not c.daemon.app.strip():
            raise self.error("daemon.app", "must name the app: a file path or package.module:attr")
        if c.daemon.log_format not in _LOG_FORMATS:
            raise self.error("daemon.log_format", f"must be one of {', '.join(_LOG_FORMATS)}")
        if c.daemon.log_level not in _LOG_LEVELS:
            raise self.error("daemon.log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
        if c.daemon.drain_timeout <= 0:
            raise self.error("daemon.drain_timeout", "must be a positive number of seconds")
        configcheck.check_store(c.store, self.error)
        check_dashboard(c.dashboard, self.error)
        check_sms(c.sms, c.providers, (c.email.provider, c.email.provider_marketing),
                  self.error)
        check_webhooks(c.webhooks, self.error)
        try:
            zoneinfo.ZoneInfo(c.daemon.default_timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise self.error("daemon.default_timezone", "must be an IANA time zone (e.g. "
                             f"Europe/Paris), not {c.daemon.default_timezone!r}") from None
        configcheck.check_http(c.http, self.error)
        configcheck.check_cors_origins(c.http.cors_origins, self.error)
        for i, key in enumerate(c.http.keys):
            if key.scope not in KEY_SCOPES:
                raise self.error(f"http.keys[{i}].scope", f"key {key.name!r}: scope must be "
                                 f"one of {', '.join(KEY_SCOPES)}, not {key.scope!r}")
        check_email(c.email, c.providers, c.http.public_url, self.error)
        for name, table in c.sources.items():
            if not table.get_str("url"):
                raise self.error(f"sources.{name}.url",
                                 "required: give url or url_env (or url_file)")
        r = c.retention
        for field in ("finished_instances", "segment_changes", "messages", "events"):
            if (getattr(r, field) or MIN_RETENTION) < MIN_RETENTION:
                raise self.error(f"retention.{field}",
                                 f'must be at least 1d (or "{FOREVER}" to keep forever)')
        if r.interval < MIN_RETENTION_INTERVAL:
            raise self.error("retention.interval", "must be at least 1m")
        if not 1 <= r.batch_size <= MAX_RETENTION_BATCH:
            raise self.error("retention.batch_size",
                             f"must be between 1 and {MAX_RETENTION_BATCH}")


def _tname(value: object) -> str:
    return {
        str: "a string", int: "an integer", float: "a number", bool: "a boolean",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)


def _absolutize(c: Config) -> Config:
    """Make relative paths absolute against the config file's folder."""
    daemon = dataclasses.replace(c.daemon, control_socket=c.resolve(c.daemon.control_socket))
    url = c.store.url
    m = re.match(r"^(sqlite\+aiosqlite:///)(.+)$", url)
    if m and not m.group(2).startswith("/") and not m.group(2).startswith(":memory:"):
        url = m.group(1) + str(c.resolve(m.group(2)))
    store = dataclasses.replace(c.store, url=url)
    return dataclasses.replace(c, daemon=daemon, store=store)
