"""Handing a batch to the provider, and reading what its answer says went out.

Delivery is at-most-once, so every failure is sorted by one question: may the message
have gone out? A :class:`~segflowd.providers.SendResult` says so per message
(``maybe_sent``) and a :class:`~segflowd.providers.SendError` for the whole call. Anything
else a provider does wrong (another exception, a wrong number of results, a result that is
not a ``SendResult``) says nothing about what went out, so it counts as maybe sent: those
messages become ``unknown`` rather than risk reaching someone twice.

Each call's duration, whatever its outcome, goes to ``segflow_provider_send_seconds``
(by provider) when the caller passes the daemon's metrics.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog

from ..metrics import PROVIDER_SEND_BUCKETS, Histogram, Metrics
from ..providers import OutgoingMessage, Provider, SendError, SendResult

__all__ = ["SEND_SECONDS", "send_batch", "send_seconds_histogram"]

log = structlog.get_logger("segflowd.delivery")


SEND_SECONDS = "segflow_provider_send_seconds"


def send_seconds_histogram(metrics: Metrics) -> Histogram:
    """The provider send histogram (a caller may make it early, to expose it at zero)."""
    return metrics.histogram(SEND_SECONDS, "provider send calls by provider, in seconds",
                             PROVIDER_SEND_BUCKETS)


async def send_batch(provider: Provider, provider_name: str,
                     messages: Sequence[OutgoingMessage], *,
                     metrics: Metrics | None = None) -> list[SendResult]:
    """One result per message, in order; never raises an :class:`Exception`.

    With ``metrics``, the call's duration is observed in ``segflow_provider_send_seconds``.
    """
    n = len(messages)
    started = time.perf_counter()
    try:
        results: object = await provider.send(messages)
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
