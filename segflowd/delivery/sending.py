"""Handing a batch to the provider, and reading what its answer says went out.

Delivery is at-most-once, so every failure is sorted by one question: may the message
have gone out? A :class:`~segflowd.providers.SendResult` says so per message
(``maybe_sent``) and a :class:`~segflowd.providers.SendError` for the whole call. Anything
else a provider does wrong (another exception, a wrong number of results, a result that is
not a ``SendResult``) says nothing about what went out, so it counts as maybe sent: those
messages become ``unknown`` rather than risk reaching someone twice.

Each call's duration, whatever its outcome, goes to ``segflow_provider_send_seconds``
(by provider) when the caller passes the daemon's metrics.

:func:`hand_over` is how delivery gives a claimed batch to the provider. Claimed rows are
``claimed``; a row turns ``sending`` only in a commit made right before the call that
hands it over, so a crash leaves ``unknown`` only what a provider may have had. A provider
that makes one call per message (SMTP, SES, the outbox's file writes) says so with an
attribute ``parallel_calls`` (how many calls it takes at once): it is given one message per
``send()``, each marked ``sending`` just before its own call, so a crash leaves at most the
messages in flight ``unknown`` (``parallel_calls`` per delivery worker) rather than the
batch. A batching provider (Postmark) is given the batch in one call, marked just before it.
A row the mark did not find still claimed (forgotten meanwhile, or a later claim took it) is
not sent, and neither is one whose mark failed (even if its COMMIT applied unheard): those
are handed back as *unsent*. Each call's answers are recorded as soon as it returns (all but
an outage's, which wait for the batch's verdict on the provider's circuit), so a crash or a
drain leaves ``unknown`` only the calls still in flight, not the answered ones.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING

import anyio
import structlog

from ..metrics import PROVIDER_SEND_BUCKETS, Histogram, Metrics
from ..providers import OutgoingMessage, OutgoingSms, Provider, SendError, SendResult, SmsProvider

if TYPE_CHECKING:
    from .outcomes import ProviderCounters
    from .prepare import Prepared

__all__ = ["SEND_SECONDS", "HandOver", "hand_over", "parallel_calls", "send_batch",
           "send_seconds_histogram"]

log = structlog.get_logger("segflowd.delivery")


SEND_SECONDS = "segflow_provider_send_seconds"


def send_seconds_histogram(metrics: Metrics) -> Histogram:
    """The provider send histogram (a caller may make it early, to expose it at zero)."""
    return metrics.histogram(SEND_SECONDS, "provider send calls by provider, in seconds",
                             PROVIDER_SEND_BUCKETS)


async def send_batch(provider: Provider | SmsProvider, provider_name: str,
                     messages: Sequence[OutgoingMessage | OutgoingSms], *,
                     metrics: Metrics | None = None) -> list[SendResult]:
    """One result per message, in order; never raises an :class:`Exception`.

    With ``metrics``, the call's duration is observed in ``segflow_provider_send_seconds``.
    """
    n = len(messages)
    started = time.perf_counter()
    try:
        results: object = await provider.send(messages)  # type: ignore[arg-type]  # reason: each lane's provider gets its channel's messages
    except SendError as exc:
        err = f"{type(exc).__name__}: {exc}"
        log.warning("provider.error", provider=provider_name, error=err,
                    maybe_sent=exc.maybe_sent, messages=n)
        if exc.maybe_sent:
            return [SendResult(ok=False, error=err, maybe_sent=True)] * n
        return [SendResult(ok=False, error=err, transient=exc.transient,
                           outage=exc.outage)] * n
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
        log.warning("provider.error", provider=provider_name, error=err, maybe_sent=True,
                    messages=n)
        return [SendResult(ok=False, maybe_sent=True, error=(
            f"the provider failed without saying whether it sent the message: {err}"))] * n
    finally:
        if metrics is not None:
            send_seconds_histogram(metrics).observe(time.perf_counter() - started,
                                                    provider=provider_name)
    if not isinstance(results, list | tuple) or len(results) != n:
        got = len(results) if isinstance(results, list | tuple) else type(results).__name__
        log.warning("provider.bad_results", provider=provider_name, expected=n, got=got)
        return [SendResult(ok=False, maybe_sent=True, error=(
            f"the provider answered {got} results for {n} messages"))] * n
    return [r if isinstance(r, SendResult) else SendResult(
        ok=False, maybe_sent=True, error=f"the provider answered {type(r).__name__}, "
                                         "not a SendResult") for r in results]


def parallel_calls(provider: Provider | SmsProvider) -> int | None:
    """How many one-message calls ``provider`` takes at once; None for a batching one.

    A provider that also sets ``concurrent_batch = True`` makes one API call per message
    but starts all the messages of a ``send()`` at once (twilio): it is handed groups of
    ``parallel_calls`` messages, each group marked ``sending`` in one commit."""
    value = getattr(provider, "parallel_calls", None)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


Mark = Callable[[list[int]], Awaitable[Collection[int]]]
Record = Callable[[list["Prepared"], dict[int, SendResult]], Awaitable[None]]


@dataclasses.dataclass
class HandOver:
    """What became of a batch handed over: each handed row's answer keyed by
    ``id(prepared)``, every answer in the order the calls returned (for the circuit), the
    rows not handed over (with why), which nothing of went out, and the ``id(prepared)``
    of those whose outcome is recorded already."""

    results: dict[int, SendResult] = dataclasses.field(default_factory=dict)
    answered: list[SendResult] = dataclasses.field(default_factory=list)
    unsent: list[tuple[Prepared, str]] = dataclasses.field(default_factory=list)
    recorded: set[int] = dataclasses.field(default_factory=set)


async def hand_over(provider: Provider | SmsProvider, provider_name: str,
                    to_send: Sequence[Prepared], *,
                    mark: Mark, handed: set[int], counters: ProviderCounters,
                    record: Record | None = None,
                    metrics: Metrics | None = None) -> HandOver:
    """Send ``to_send`` (prepared rows with a message), each group of it marked ``sending``
    by ``mark`` (which returns the ids it marked) right before its call.

    The ids handed over are added to ``handed`` before each call, for a caller cancelled
    mid-way (an outage's answer takes them out again: nothing went out); ``record`` (when
    given) records each call's answers but an outage's as soon as it returns, and the ids
    it recorded leave ``handed`` (a record that fails is left to the caller's record of the
    batch).
    """
    per_call = parallel_calls(provider)
    if per_call is not None and getattr(provider, "concurrent_batch", False) is True:
        # It starts every message of a call at once: groups of per_call, each marked in
        # one commit and all in flight together, one group at a time (what is marked is
        # what is in flight, as with one message a call, for a fifth of the commits).
        groups = [list(to_send[i:i + per_call]) for i in range(0, len(to_send), per_call)]
        limit = anyio.Semaphore(1)
    else:
        groups = [[p] for p in to_send] if per_call is not None else [list(to_send)]
        limit = anyio.Semaphore(per_call or 1)
    out = HandOver()

    async def one(group: list[Prepared]) -> None:
        async with limit:
            ids = [int(p.row["id"]) for p in group]
            try:
                marked = set(await mark(ids))
            except Exception as exc:  # nothing was handed over: try again later
                log.warning("delivery.mark_failed", provider=provider_name,
                            messages=len(ids), error=f"{type(exc).__name__}: {exc}")
                marked = set()
                error = f"not sent: marking it sending failed: {type(exc).__name__}: {exc}"
            else:
                error = "not sent: the message was no longer claimed (forgotten or re-claimed)"
            going = [p for p in group if int(p.row["id"]) in marked]
            out.unsent.extend((p, error) for p in group if int(p.row["id"]) not in marked)
            if not going:
                return
            handed.update(int(p.row["id"]) for p in going)
            counters.in_flight += len(going)
            try:
                answers = await send_batch(provider, provider_name,
                                           [p.message for p in going if p.message],
                                           metrics=metrics)
            finally:
                counters.in_flight -= len(going)
                counters.batches += 1
            pairs = list(zip(going, answers, strict=True))
            out.results.update((id(p), r) for p, r in pairs)
            out.answered.extend(answers)
            # An outage answer says nothing went out: a cancelled caller queues it again.
            handed.difference_update(int(p.row["id"]) for p, r in pairs
                                     if r.outage and not r.maybe_sent)
            await _record_now(record, [p for p, r in pairs if not r.outage], out, handed)

    async with anyio.create_task_group() as tg:
        for group in groups:
            tg.start_soon(one, group)
    return out


async def _record_now(record: Record | None, settled: list[Prepared], out: HandOver,
                      handed: set[int]) -> None:
    """Record ``settled`` (answered, no outage) now; a failure leaves them to the batch."""
    if record is None or not settled:
        return
    try:
        await record(settled, out.results)
    except Exception as exc:
        log.warning("delivery.record_deferred", messages=len(settled),
                    error=f"{type(exc).__name__}: {exc}")
        return
    handed.difference_update(int(p.row["id"]) for p in settled)
    out.recorded.update(id(p) for p in settled)
