"""What an httpx failure says about a request: certainly not sent, or maybe sent.

A provider's API call either never left (no connection could be made: retry it) or may
have reached the provider (it timed out or lost the connection afterwards, or a gateway
lost the provider's answer): then the message may have gone out and must not be re-sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
import httpx

from segflowd.providers import SendResult

M = TypeVar("M")

# Failures before any byte of the request left: the provider certainly has nothing.
NOT_SENT: tuple[type[httpx.HTTPError], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
# A gateway in front of the provider answered for it: its upstream had the request.
GATEWAY_ERRORS = frozenset({502, 504})


def maybe_sent(plugin: str, why: str) -> SendResult:
    """The answer for a message that may have reached ``plugin``'s API (never re-sent)."""
    return SendResult(ok=False, error=f"{plugin}: {why} (may have been sent: not retried)",
                      maybe_sent=True)


async def send_each(plugin: str, messages: Sequence[M],
                    send_one: Callable[[M], Awaitable[SendResult]],
                    limit: anyio.Semaphore) -> list[SendResult]:
    """One API call per message, all started at once within ``limit``; one result per
    message, in order. A call that raises never cancels the others nor loses their
    answers: its message may have gone out."""
    results: list[SendResult | None] = [None] * len(messages)

    async def one(i: int, msg: M) -> None:
        async with limit:
            try:
                results[i] = await send_one(msg)
            except Exception as exc:
                results[i] = maybe_sent(plugin, f"{type(exc).__name__}: {exc}")

    async with anyio.create_task_group() as tg:
        for i, msg in enumerate(messages):
            tg.start_soon(one, i, msg)
    return [r or maybe_sent(plugin, "no answer") for r in results]
