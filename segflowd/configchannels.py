"""The ``[sms]`` and ``[webhooks]`` sections: SMS and outbound webhooks as flow steps.

``[sms]``::

    provider = "twilio"            # names a [providers.NAME] table (plugin = "twilio")
    quiet_hours = "21:00-08:00"    # marketing SMS due inside them waits until they end
    max_marketing = "2/week"       # frequency caps per user (segflowd/caps.py)
    cap_action = "defer"           # over a cap: held until allowed, or "drop"
    help_text = "..."              # the answer to an inbound HELP

``[webhooks]``::

    allow = ["https://hooks.slack.com/*"]   # what rt.webhook() may call (fnmatch on the URL)
    max_attempts = 5
    [webhooks.headers."https://api.example.com/*"]
    Authorization_env = "CRM_TOKEN"        # added to calls whose URL matches; secrets
                                            # never appear in the flow's code

Both sections are optional: without ``[sms] provider`` a ``send_sms`` step fails its
message with a reason; without ``allow`` every webhook is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from .caps import check_cap_action, parse_caps
from .errors import ConfigError

__all__ = ["SmsConfig", "WebhookHeaders", "WebhooksConfig", "check_sms", "check_webhooks",
           "parse_quiet_hours"]

ErrorFactory = Callable[[str, str], ConfigError]

DEFAULT_HELP = "Reply STOP to unsubscribe, START to subscribe again."
MAX_WEBHOOK_BODY = 256 * 1024  # bytes of a webhook's answer a flow can see


@dataclasses.dataclass(frozen=True)
class SmsConfig:
    provider: str = ""  # "" : no SMS provider; a send_sms fails with that reason
    quiet_hours: str = ""  # "HH:MM-HH:MM" in the user's time zone; "" : none
    help_text: str = DEFAULT_HELP
    max_attempts: int = 5  # sends of one SMS before a transient error fails it
    max_marketing: str = ""  # frequency caps per user, as [email] max_marketing
    cap_action: str = "defer"  # over a cap: "defer" (held) or "drop" (suppressed)


@dataclasses.dataclass(frozen=True)
class WebhookHeaders:
    """Headers added to every call whose URL matches ``pattern`` (values are secrets)."""

    pattern: str
    headers: tuple[tuple[str, str], ...] = dataclasses.field(repr=False, default=())


@dataclasses.dataclass(frozen=True)
class WebhooksConfig:
    allow: tuple[str, ...] = ()  # URL patterns rt.webhook() may call
    max_attempts: int = 5  # calls of one webhook before WebhookFailed
    retry_base: float = 5.0  # seconds before the first retry; doubles each attempt
    retry_max: float = 600.0  # seconds: the longest wait between attempts
    max_body: int = MAX_WEBHOOK_BODY  # bytes of an answer kept for the flow
    concurrency: int = 32  # calls in flight at once
    headers: tuple[WebhookHeaders, ...] = ()  # from [webhooks.headers."PATTERN"] tables


_CLOCK = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_quiet_hours(text: str) -> tuple[dt.time, dt.time] | None:
    """``"21:00-08:00"`` → (21:00, 08:00); None for ""; ValueError when malformed."""
    if not text.strip():
        return None
    m = _CLOCK.match(text)
    if m is None:
        raise ValueError(f'must be "HH:MM-HH:MM" (e.g. "21:00-08:00"), not {text!r}')
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    try:
        start, end = dt.time(h1, m1), dt.time(h2, m2)
    except ValueError:
        raise ValueError(f"{text!r} is not a pair of clock times") from None
    if start == end:
        raise ValueError(f"{text!r} is empty: start and end are the same time")
    return start, end


def check_sms(c: SmsConfig, providers: Mapping[str, object], mail: tuple[str, ...],
              error: ErrorFactory) -> None:
    """``mail``: the providers of [email] (an SMS provider needs a table of its own)."""
    if c.provider and c.provider not in providers:
        known = ", ".join(sorted(providers)) or "none configured"
        raise error("sms.provider", f"names no [providers.{c.provider}] table ({known})")
    if c.provider and c.provider in mail:
        raise error("sms.provider", f"[providers.{c.provider}] sends mail: give SMS a "
                    'table of its own (e.g. [providers.sms] plugin = "twilio")')
    try:
        parse_quiet_hours(c.quiet_hours)
    except ValueError as exc:
        raise error("sms.quiet_hours", str(exc)) from None
    if c.max_attempts < 1:
        raise error("sms.max_attempts", "must be at least 1")
    try:
        parse_caps(c.max_marketing)
    except ValueError as exc:
        raise error("sms.max_marketing", str(exc)) from None
    try:
        check_cap_action(c.cap_action)
    except ValueError as exc:
        raise error("sms.cap_action", str(exc)) from None


def check_webhooks(c: WebhooksConfig, error: ErrorFactory) -> None:
    for i, pattern in enumerate(c.allow):
        parts = urlsplit(pattern)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise error(f"webhooks.allow[{i}]", f"{pattern!r} must be an http:// or https:// "
                        "URL pattern (e.g. https://hooks.slack.com/*)")
    for field in ("max_attempts", "max_body", "concurrency"):
        if getattr(c, field) < 1:
            raise error(f"webhooks.{field}", "must be at least 1")
    if c.retry_base <= 0 or c.retry_max < c.retry_base:
        raise error("webhooks.retry_base", "must be positive and at most retry_max")


def parse_webhook_headers(table: object, resolve: Callable[[Mapping[str, object], str],
                                                           dict[str, object]],
                          error: ErrorFactory) -> tuple[WebhookHeaders, ...]:
    """``[webhooks.headers."PATTERN"]`` tables: header names to values (``NAME_env`` and
    ``NAME_file`` read them from the environment or a file, through ``resolve``)."""
    if not isinstance(table, dict):
        raise error("webhooks.headers", 'must hold tables like [webhooks.headers."https://..."]')
    out = []
    for pattern, headers in table.items():
        where = f"webhooks.headers.{pattern}"
        if not isinstance(headers, dict):
            raise error(where, "must be a table of header names to values")
        resolved = resolve(headers, where)
        pairs = []
        for name, value in resolved.items():
            if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9-]+", name):
                raise error(f"{where}.{name}", "must be a header name with a string value")
            if any(c in value for c in "\r\n"):
                raise error(f"{where}.{name}", "must not contain a line break")
            pairs.append((name, value))
        out.append(WebhookHeaders(str(pattern), tuple(pairs)))
    return tuple(out)
