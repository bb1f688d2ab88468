"""The provider plugin interface and its loader.

A provider is found by name in the ``segflow.providers`` entry-point group and built
with its ``[providers.NAME]`` table. Built-ins register the same way a third party does.

Every failure a provider reports says whether the message may have gone out, because
delivery is at-most-once: a message that *certainly* did not go out (the connection was
refused, the provider answered with a refusal) may be retried; one that *may* have gone
out (no answer after the request was sent, an answer that cannot be read) is recorded
``unknown`` and never re-sent by itself. Per message that is :attr:`SendResult.maybe_sent`;
for a whole call, :class:`SendError`. Any other exception from :meth:`Provider.send`, or a
wrong number of results, says nothing about what went out and counts as maybe sent.
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
    "MARKETING_KINDS",
    "SMS_ENTRY_POINT_GROUP",
    "ForgettingProvider",
    "OutgoingMessage",
    "OutgoingSms",
    "Provider",
    "ProviderContext",
    "RemoteCopies",
    "SendError",
    "SendResult",
    "SmsProvider",
    "available_providers",
    "load_provider",
    "load_sms_provider",
]

ENTRY_POINT_GROUP = "segflow.providers"
# SMS providers register apart: a [providers.NAME] table named by [sms] provider is
# built from this group, by the same rules.
SMS_ENTRY_POINT_GROUP = "segflow.sms_providers"
# Keys of a [providers.NAME] table that delivery reads itself; the plugin gets the rest.
DELIVERY_OPTIONS = frozenset({"rate", "burst", "concurrency", "render_processes",
                              "webhook_username", "webhook_password", "webhook_topic_arn"})


# Message kinds that are marketing (bulk) mail; "transaction" and "test" are not.
MARKETING_KINDS = frozenset({"campaign", "broadcast"})


@dataclasses.dataclass(frozen=True)
class OutgoingMessage:
    """A rendered message ready to send: ``mime`` is the whole RFC 5322 message.

    The parts are also given separately for APIs that take JSON rather than MIME
    (Postmark): ``headers`` are the extra headers (List-Unsubscribe, ...), already safe.
    ``kind`` is the message's kind (``campaign``, ``broadcast``, ``transaction``,
    ``test``; empty when not known): a provider may send marketing kinds
    (:data:`MARKETING_KINDS`) apart, on a stream or configuration set of their own.
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
    kind: str = ""

    @property
    def marketing(self) -> bool:
        """Whether this is marketing (bulk) mail: a campaign's or a broadcast's."""
        return self.kind in MARKETING_KINDS


@dataclasses.dataclass(frozen=True)
class OutgoingSms:
    """A rendered SMS ready to send: ``body`` to ``to`` (E.164, ``+14155550100``).

    The sender (``from``) is the provider's own option. ``status_callback`` is the URL
    at which the daemon takes the provider's delivery reports for this message (empty
    when the daemon has no public URL): a provider that can report status sends them
    there. ``kind`` as :attr:`OutgoingMessage.kind`.
    """

    id: int  # the outbox row
    to: str
    body: str
    kind: str = ""
    status_callback: str = ""

    @property
    def marketing(self) -> bool:
        return self.kind in MARKETING_KINDS


@dataclasses.dataclass(frozen=True)
class SendResult:
    """The provider's answer for one message.

    ``ok``: sent (``provider_message_id`` is stored, clipped to 255 characters).
    Otherwise ``maybe_sent`` says the message may have gone out all the same: it is
    recorded ``unknown`` and never retried (``transient`` and ``suppress`` are ignored).
    Without it the message certainly did not go out: ``transient`` errors are retried
    with backoff and permanent ones fail the message (and suppress the address when
    ``suppress`` is set). ``outage`` says the provider itself is at fault, not the
    message (its credentials, its account, its configuration, its servers, the way to
    them): the message is kept queued without spending an attempt, and delivery pauses
    the provider, probing it now and then, until a send is answered again.
    """

    ok: bool
    provider_message_id: str | None = None
    error: str | None = None
    transient: bool = False
    suppress: bool = False
    maybe_sent: bool = False
    outage: bool = False


class SendError(ProviderError):
    """Raised by :meth:`Provider.send` when the whole call failed, saying what went out.

    ``maybe_sent=False``: the provider certainly took none of the messages (connection
    refused, an answered refusal); each is retried when ``transient``, failed otherwise.
    ``maybe_sent=True``: some or all may have gone out; each is recorded ``unknown``.
    ``outage=True`` (with ``maybe_sent=False``): the provider itself is down or refuses
    the account (see :attr:`SendResult.outage`).
    A provider that knows the outcome of each message returns results instead.
    """

    def __init__(self, message: str, *, maybe_sent: bool, transient: bool = True,
                 outage: bool = False) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent
        self.transient = transient
        self.outage = outage


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
        """One result per message, in order.

        Raise :class:`SendError` only for a failure of the whole call. Any other exception
        (or a wrong number of results) makes every message of the call ``unknown``.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class SmsProvider(Protocol):
    """Sends batches of SMS, with the answers and errors of :class:`Provider`."""

    max_batch: int

    async def send(self, messages: Sequence[OutgoingSms]) -> list[SendResult]:
        """One result per message, in order (see :meth:`Provider.send`)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class ForgettingProvider(Protocol):
    """A provider that keeps copies of what it sent where Segflow can reach them (the
    ``outbox`` provider's files) implements this too, so a forgotten user's go."""

    async def forget_messages(self, message_ids: Sequence[int]) -> int:
        """Delete what is kept of these outbox rows' messages; how many were found.
        Ids of which nothing is kept are no error."""
        ...


@runtime_checkable
class RemoteCopies(Protocol):
    """A provider that keeps copies on its side (Twilio keeps each message's body and
    numbers) and can delete them by its own message id implements this too."""

    async def forget_sent(self, sent: Sequence[tuple[int, str]]) -> Sequence[int]:
        """Delete the provider's copies of these ``(outbox row id, provider_message_id)``
        pairs; return the row ids whose copies are gone for good (deleted now or already
        gone). An id left out, or an exception, means "not now": it is asked again later."""
        ...


def available_providers(group: str = ENTRY_POINT_GROUP) -> list[str]:
    return sorted(ep.name for ep in entry_points(group=group))


def load_provider(ctx: ProviderContext) -> Provider:
    """Build the email provider named by ``ctx.options["plugin"]`` (default: ``ctx.name``).

    The plugin is given the options less :data:`DELIVERY_OPTIONS` (delivery's own keys).
    """
    provider = _load(ctx, ENTRY_POINT_GROUP)
    if not isinstance(provider, Provider):
        raise ProviderError(f"[providers.{ctx.name}]: plugin {_plugin(ctx)!r} does not "
                            "implement the Provider protocol (max_batch, send, aclose)")
    return provider


def load_sms_provider(ctx: ProviderContext) -> SmsProvider:
    """Build the SMS provider of ``ctx`` from :data:`SMS_ENTRY_POINT_GROUP`, as
    :func:`load_provider` builds an email one."""
    provider = _load(ctx, SMS_ENTRY_POINT_GROUP)
    if not isinstance(provider, SmsProvider):
        raise ProviderError(f"[providers.{ctx.name}]: plugin {_plugin(ctx)!r} does not "
                            "implement the SmsProvider protocol (max_batch, send, aclose)")
    return provider


def _plugin(ctx: ProviderContext) -> str:
    return str(ctx.options.get("plugin", ctx.name))


def _load(ctx: ProviderContext, group: str) -> object:
    plugin = _plugin(ctx)
    found = [ep for ep in entry_points(group=group) if ep.name == plugin]
    if not found:
        known = ", ".join(available_providers(group)) or "none"
        raise ProviderError(f"[providers.{ctx.name}]: no provider plugin {plugin!r} is "
                            f"installed (entry points in {group}: {known})")
    try:
        factory = found[0].load()
    except Exception as exc:
        raise ProviderError(f"[providers.{ctx.name}]: plugin {plugin!r} failed to import: "
                            f"{type(exc).__name__}: {exc}") from None
    ctx = dataclasses.replace(ctx, options={
        k: v for k, v in ctx.options.items() if k not in DELIVERY_OPTIONS})
    try:
        provider: object = factory(ctx)
    except ProviderError:
        raise
    except Exception as exc:
        raise ProviderError(f"[providers.{ctx.name}]: {type(exc).__name__}: {exc}") from None
    return provider
