"""The provider plugin interface and its loader.

A provider is found by name in the ``segflow.providers`` entry-point group and built
with its ``[providers.NAME]`` table. Built-ins register the same way a third party does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import ProviderError

__all__ = [
    "DELIVERY_OPTIONS",
    "ENTRY_POINT_GROUP",
    "OutgoingMessage",
    "Provider",
    "ProviderContext",
    "SendResult",
    "available_providers",
    "load_provider",
]

ENTRY_POINT_GROUP = "segflow.providers"
# Keys of a [providers.NAME] table that delivery reads itself; the plugin gets the rest.
DELIVERY_OPTIONS = frozenset({"rate", "burst", "concurrency", "render_processes",
                              "webhook_username", "webhook_password", "webhook_topic_arn"})


@dataclasses.dataclass(frozen=True)
class OutgoingMessage:
    """A rendered message ready to send: ``mime`` is the whole RFC 5322 message.

    The parts are also given separately for APIs that take JSON rather than MIME
    (Postmark): ``headers`` are the extra headers (List-Unsubscribe, ...), already safe.
    """

    id: int  # the outbox row
    message_id: str  # RFC 5322 Message-ID, without angle brackets
    sender: str
    to: str
    subject: str
    mime: bytes
    html: str = ""
    text: str = ""
    reply_to: str = ""
    headers: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class SendResult:
    """The provider's answer for one message.

    ``ok`` sent; otherwise ``transient`` errors are retried with backoff and permanent ones
    fail the message (and suppress the address when ``suppress`` is set).
    """

    ok: bool
    provider_message_id: str | None = None
    error: str | None = None
    transient: bool = False
    suppress: bool = False


@dataclasses.dataclass(frozen=True)
class ProviderContext:
    """What a provider is built with: its name, options and the config's folder."""

    name: str
    options: Mapping[str, object]
    base_dir: Path


@runtime_checkable
class Provider(Protocol):
    """Sends batches of messages. ``max_batch`` caps how many one call receives."""

    max_batch: int

    async def send(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """One result per message, in order. Raise only for a failure of the whole call."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def available_providers() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_provider(ctx: ProviderContext) -> Provider:
    """Build the provider named by ``ctx.options["plugin"]`` (default: ``ctx.name``).

    The plugin is given the options less :data:`DELIVERY_OPTIONS` (delivery's own keys).
    """
    plugin = str(ctx.options.get("plugin", ctx.name))
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == plugin]
    if not found:
        known = ", ".join(available_providers()) or "none"
        raise ProviderError(f"[providers.{ctx.name}]: no provider plugin {plugin!r} is "
                            f"installed (entry points in {ENTRY_POINT_GROUP}: {known})")
    try:
        factory = found[0].load()
    except Exception as exc:
        raise ProviderError(f"[providers.{ctx.name}]: plugin {plugin!r} failed to import: "
                            f"{type(exc).__name__}: {exc}") from None
    ctx = dataclasses.replace(ctx, options={
        k: v for k, v in ctx.options.items() if k not in DELIVERY_OPTIONS})
    try:
        provider = factory(ctx)
    except ProviderError:
        raise
    except Exception as exc:
        raise ProviderError(f"[providers.{ctx.name}]: {type(exc).__name__}: {exc}") from None
    if not isinstance(provider, Provider):
        raise ProviderError(f"[providers.{ctx.name}]: plugin {plugin!r} does not implement "
                            "the Provider protocol (max_batch, send, aclose)")
    return provider
