"""What a provider keeps of a forgotten user's messages: deleted after the forget.

A provider that keeps copies where Segflow can reach them (the ``outbox`` provider's
``.eml`` files) implements :class:`~segflowd.providers.ForgettingProvider`. The forget
itself is one store transaction in ingest; the copies go right after it commits, told
through the ingest batch (:attr:`~segflowd.hooks.IngestBatch.forgotten_messages`). If the
process dies in between, the start sweeps again: a sent message of a forgotten user is
one with neither user nor address, and the provider is asked to delete its copies.
A provider keeping copies on its side (Twilio) is asked by its message id: see
:mod:`~segflowd.delivery.remotecopies`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import anyio
import sqlalchemy as sa
import structlog

from ..hooks import IngestBatch
from ..kernel import Kernel
from ..providers import ForgettingProvider, Provider, SmsProvider
from ..schema import messages
from .remotecopies import RemoteForget

__all__ = ["ProviderCopies"]

log = structlog.get_logger("segflowd.delivery")

SENT = ("sent", "unknown")  # statuses a provider may have kept a copy for
RETRY_DELAY = 60.0  # seconds before deleting copies again after a failure


class ProviderCopies:
    """Deletes the provider's copies of forgotten users' messages (an ingest sink)."""

    def __init__(self, k: Kernel,
                 providers: Callable[[], Sequence[Provider | SmsProvider]],
                 named: Callable[[], Mapping[str, object]] = dict) -> None:
        self.k = k
        self._providers = providers  # every provider mail went out through
        self.remote = RemoteForget(k, named)  # copies deleted by the provider's id
        self._pending: set[int] = set()
        self._wake = anyio.Event()
        self.deleted = 0  # copies deleted since start

    def ingested(self, batch: IngestBatch) -> None:
        if batch.forgotten_messages:
            self._pending.update(batch.forgotten_messages)
            self.remote.add(batch.forgotten_messages)
            self._wake.set()

    async def run(self) -> None:
        """Sweep once (a forget the last process did not finish), then follow forgets."""
        if not self._forgetting() and not self.remote.providers():
            return
        try:
            await self.remote.sweep()
        except Exception as exc:
            log.warning("delivery.copies_sweep_failed", error=f"{type(exc).__name__}: {exc}")
        try:
            async with self.k.store.connect() as conn:
                found = {int(i) for (i,) in await conn.execute(
                    sa.select(messages.c.id).where(
                        messages.c.user_id.is_(None), messages.c.to_address.is_(None),
                        messages.c.status.in_(SENT)))}
            self._pending |= found
        except Exception as exc:  # the forgets of this run are still followed
            log.warning("delivery.copies_sweep_failed", error=f"{type(exc).__name__}: {exc}")
        while True:
            if self._pending or self.remote.pending:
                await self.forget_now()
            if self._pending or self.remote.pending:  # failed: again later (or at a forget)
                with anyio.move_on_after(RETRY_DELAY):
                    await self._wake.wait()
            else:
                await self._wake.wait()
            self._wake = anyio.Event()

    def _forgetting(self) -> list[ForgettingProvider]:
        return [p for p in self._providers() if isinstance(p, ForgettingProvider)]

    async def forget_now(self) -> int:
        """Ask the providers to delete the copies pending now; how many they found."""
        return await self._forget_kept() + await self.remote.forget_now()

    async def _forget_kept(self) -> int:
        providers = self._forgetting()
        ids, self._pending = sorted(self._pending), set()
        if not ids or not providers:
            return 0
        try:  # each is asked of every id: one finds the copies of what it sent
            n = sum([await p.forget_messages(ids) for p in providers])
        except Exception as exc:
            self._pending.update(ids)
            log.warning("delivery.copies_not_deleted", messages=len(ids),
                        error=f"{type(exc).__name__}: {exc}")
            return 0
        self.deleted += n
        if n:
            log.info("delivery.copies_deleted", copies=n)
        return n
