"""Every exception Segflow raises on purpose.

    SegflowError                 base; ``str(exc)`` is a complete sentence for a person
    ├── ConfigError              segflow.toml is missing, malformed or invalid (exit 2)
    ├── AppError                 the user's app failed to load or does not validate
    ├── TemplateError            a template is missing or does not render
    ├── StoreError               the store failed
    │   ├── StoreUnavailable     the store cannot be reached (HTTP 503, retry later)
    │   ├── SchemaTooNew         the store's schema is newer than this segflowd knows
    │   └── StoreLocked          another segflowd runs on the store (names it; exit 2)
    ├── ProviderError            a delivery provider could not be loaded or configured
    ├── FlowError                a campaign flow misused the runtime (bad wait, unknown source)
    │   └── WebhookFailed        an ``rt.webhook`` call failed for good (thrown into the flow)
    ├── TokenError               a signed link token is malformed, forged or for elsewhere
    ├── IngestError              the store refused ingested data (HTTP 422)
    ├── ListenError              the HTTP listener could not be bound
    ├── SourceError              a data source (customer database) failed; names the source
    │   └── PlaceholderError     a ``<%= name %>`` placeholder has no value (names it)
    └── ControlError             the control socket (daemon side or client side)
        ├── ControlSocketError   the daemon cannot create its socket (a live one is there)
        ├── ControlUnavailable   a client cannot reach the daemon's socket
        └── ControlReplyError    the daemon answered a request with an error (``code``)

A user's mistake (bad config, bad app, bad template) is reported with ``str(exc)``
and never with a traceback.
"""

from __future__ import annotations

__all__ = [
    "AppError",
    "ConfigError",
    "ControlError",
    "ControlReplyError",
    "ControlSocketError",
    "ControlUnavailable",
    "FlowError",
    "IngestError",
    "ListenError",
    "PlaceholderError",
    "ProviderError",
    "SchemaTooNew",
    "SegflowError",
    "SourceError",
    "StoreError",
    "StoreLocked",
    "StoreUnavailable",
    "TemplateError",
    "TokenError",
    "WebhookFailed",
]


class SegflowError(Exception):
    """Base of every deliberate Segflow error."""


class ConfigError(SegflowError):
    """The configuration file or an environment override is invalid.

    ``file``, ``key`` and ``line`` locate the problem where they are known.
    """

    def __init__(
        self, message: str, *, file: str | None = None, key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.file = file
        self.key = key
        self.line = line
        self.reason = message
        where = file or "<config>"
        if line is not None:
            where += f":{line}"
        if key:
            where += f": {key}"
        super().__init__(f"{where}: {message}")


class AppError(SegflowError):
    """The user's app could not be loaded, or its definitions do not fit together."""


class TemplateError(SegflowError):
    """A template is missing or fails to render."""


class StoreError(SegflowError):
    """A store operation failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached; the caller may retry later."""


class SchemaTooNew(StoreError):
    """The store was migrated by a newer segflowd than this one."""


class StoreLocked(StoreError):
    """Another segflowd holds the store's daemon lock (see :mod:`segflowd.lock`).

    ``str(exc)`` names the holder: host and pid (SQLite), or the server connection.
    """


class ProviderError(SegflowError):
    """A delivery provider plugin could not be found or configured."""


class FlowError(SegflowError):
    """A campaign flow misused the runtime (a bad argument, a condition on an unknown source).

    It fails that instance, never the daemon; ``str(exc)`` is stored as its error.
    """


class WebhookFailed(FlowError):
    """An ``rt.webhook`` call failed for good: refused by ``[webhooks] allow``, or its last
    attempt (``[webhooks] max_attempts``) met a connection error, a timeout, a 5xx or a 429.

    Thrown into the flow at its ``yield``, which may catch it; uncaught, the instance fails
    with ``str(exc)`` as its error.
    """


class TokenError(SegflowError):
    """A signed token (unsubscribe, tracking) did not verify: malformed, forged or misused."""


class IngestError(SegflowError):
    """Ingested data passed validation but the store refused it (too wide a value, ...)."""


class ListenError(SegflowError):
    """The HTTP listener could not be bound (port in use, bad address)."""


class SourceError(SegflowError):
    """A ``[sources.NAME]`` database is unreachable, refused a query, or returned bad rows.

    ``source`` is the source's name; the message names it and carries the database's own
    message. It fails the one operation (a sync, a condition, a preload), never the daemon.
    """

    def __init__(self, source: str, message: str) -> None:
        super().__init__(message)
        self.source = source


class PlaceholderError(SourceError):
    """A query's ``<%= name %>`` placeholder has no value, or names an unknown parameter."""


# -- control -----------------------------------------------------------------------------
class ControlError(SegflowError):
    """The control socket failed, on the daemon's side or a client's."""


class ControlSocketError(ControlError):
    """The daemon cannot create its control socket (in use by a live daemon, bad path)."""


class ControlUnavailable(ControlError):
    """A client cannot reach the daemon: no socket, permission denied, connection lost."""


class ControlReplyError(ControlError):
    """The daemon answered with an error; ``code`` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
