"""The ``[email]`` section: sender, providers, secrets, retries (see :mod:`segflowd.config`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

from .caps import check_cap_action, parse_caps
from .errors import ConfigError

__all__ = ["EmailConfig", "check_email"]


class _Table(Protocol):
    @property
    def options(self) -> Mapping[str, object]: ...


@dataclasses.dataclass(frozen=True)
class EmailConfig:
    from_: str = "Segflow <segflow@localhost>"
    reply_to: str = ""
    provider: str = "outbox"
    # The provider of marketing mail (campaigns, broadcasts); "" sends it through
    # ``provider`` too. Apart, a complaint spike on a newsletter cannot hurt resets.
    provider_marketing: str = ""
    unsubscribe_mailto: str = ""
    # delivery (segflowd/delivery.py): the HMAC key of unsubscribe/tracking tokens
    # (secret or secret_env), tracking for every template, retries and polling.
    secret: str = dataclasses.field(default="", repr=False)
    # Older secrets: links they signed still verify (rotation); only ``secret`` signs.
    secret_previous: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    track: bool = False
    max_attempts: int = 5  # sends of one message before a transient error fails it
    retry_base: float = 30.0  # seconds before the first retry; doubles each attempt
    retry_max: float = 3600.0  # seconds: the longest wait between attempts
    poll_interval: float = 1.0  # seconds between outbox polls when nobody wakes delivery
    # Frequency caps on marketing mail per user (segflowd/caps.py), e.g. "3/day, 10/week";
    # "" : none. Over a cap a message waits ("defer") or is never sent ("drop").
    max_marketing: str = ""
    cap_action: str = "defer"



def check_email(email: EmailConfig, providers: Mapping[str, _Table], public_url: str,
                error: Callable[[str, str], ConfigError]) -> None:
    """Raise ``error(key, message)`` for the first fault of ``[email]`` and its providers."""
    for name, table in providers.items():
        plugin = table.options.get("plugin", name)
        if not isinstance(plugin, str) or not plugin:
            raise error(f"providers.{name}.plugin", "must name an entry point")
    if email.provider not in providers:
        known = ", ".join(sorted(providers)) or "none configured"
        raise error(
            "email.provider", f"names no [providers.{email.provider}] table ({known})"
        )
    if email.secret_previous and not email.secret:
        raise error("email.secret_previous", "needs [email] secret too: only it signs, "
                    "the previous secrets verify links already sent")
    try:
        parse_caps(email.max_marketing)
    except ValueError as exc:
        raise error("email.max_marketing", str(exc)) from None
    try:
        check_cap_action(email.cap_action)
    except ValueError as exc:
        raise error("email.cap_action", str(exc)) from None
    marketing = email.provider_marketing
    if marketing and marketing not in providers:
        known = ", ".join(sorted(providers)) or "none configured"
        raise error("email.provider_marketing",
                    f"names no [providers.{marketing}] table ({known})")
    for name in dict.fromkeys((email.provider, marketing or email.provider)):
        plugin = providers[name].options.get("plugin", name)
        if not public_url and plugin != "outbox":
            raise error(
                "http.public_url",
                f"required when mail goes out through [providers.{name}] "
                f"({plugin}): the unsubscribe and tracking links in every message "
                "point at it (e.g. https://mail.example.com)")
