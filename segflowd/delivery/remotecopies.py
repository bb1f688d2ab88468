"""What a provider keeps on its side of a forgotten user's messages: deleted by its id.

A provider that keeps copies Segflow can delete only through its API (Twilio keeps each
SMS's body and numbers) implements :class:`~segflowd.providers.RemoteCopies`. It needs the
provider's id of each message, ``messages.provider_message_id``, which the forget keeps
(it clears the user, address, data and response, never the provider's id): the id is
cleared here once the provider says the copy is gone, so a row still holding one under a
forgotten user (no user, no address) is a copy not yet deleted. The start sweeps those,
which covers a process that died between the forget's commit and the deletes.

A message still being sent when its user was forgotten (``sending``) has no provider id
yet: it stays pending until its send is recorded. Whatever the provider could not delete
now (Twilio refuses a message whose delivery is not complete) stays pending and is asked
again after :data:`~segflowd.delivery.forgetting.RETRY_DELAY`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import anyio
import sqlalchemy as sa
import structlog

from ..kernel import Kernel
from ..providers import RemoteCopies
from ..schema import messages

__all__ = ["RemoteForget"]

log = structlog.get_logger("segflowd.delivery")

CHUNK = 500  # row ids per query (bound parameters stay well under every limit)
# Seconds between asks of the copies not deleted yet (forgetting.RETRY_DELAY): a forget
# meanwhile asks only of its own messages, so a stream of forgets during an outage or a
# backlog Twilio refuses does not ask again of the whole backlog at each forget.
RETRY_EVERY = 60.0


class RemoteForget:
    """The forgotten messages whose provider copy is still to be deleted."""

    def __init__(self, k: Kernel, named: Callable[[], Mapping[str, object]]) -> None:
        self.k = k
        self._named = named  # provider name (messages.provider) -> provider
        self.pending: set[int] = set()
        self._fresh: set[int] = set()  # not asked of yet: a forget's or the sweep's
        self._retried_at = -RETRY_EVERY  # anyio time all pending copies were last asked of
        self.deleted = 0  # copies deleted (or found gone) since start

    def providers(self) -> dict[str, RemoteCopies]:
        return self._lookup()[0]

    def _lookup(self) -> tuple[dict[str, RemoteCopies], set[str]]:
        """The providers keeping copies, by name; and every configured provider's name."""
        try:
            named = self._named()
        except Exception as exc:  # a plugin that cannot load: nothing to ask it
            log.warning("delivery.remote_copies_no_provider",
                        error=f"{type(exc).__name__}: {exc}")
            return {}, set()
        return {n: p for n, p in named.items() if isinstance(p, RemoteCopies)}, set(named)

    def add(self, ids: Iterable[int]) -> None:
        new = set(ids)
        self.pending |= new  # forget_now drops them when no provider keeps copies
        self._fresh |= new

    async def sweep(self) -> None:
        """Find the forgotten messages whose copy a past run did not delete."""
        names = sorted(self.providers())
        if not names:
            return
        async with self.k.store.connect() as conn:
            found = {int(i) for (i,) in await conn.execute(
                sa.select(messages.c.id).where(
                    messages.c.user_id.is_(None), messages.c.to_address.is_(None),
                    messages.c.provider.in_(names),
                    messages.c.provider_message_id.is_not(None)))}
        self.pending |= found
        self._fresh |= found

    async def forget_now(self) -> int:
        """Ask each provider to delete the pending copies; how many are gone now."""
        providers, configured = self._lookup()
        now = anyio.current_time()
        fresh, self._fresh = self._fresh & self.pending, set()
        if fresh and now - self._retried_at < RETRY_EVERY:  # a forget: its own only
            ids = sorted(fresh)
            self.pending -= fresh
        else:
            ids, self.pending = sorted(self.pending), set()
            self._retried_at = now
        if not ids or not providers:
            return 0
        try:
            rows, waiting = await self._rows(ids, sorted(providers))
            if configured:
                await self._unconfigured(ids, configured)
        except Exception as exc:
            self.pending.update(ids)
            log.warning("delivery.remote_copies_not_read", messages=len(ids),
                        error=f"{type(exc).__name__}: {exc}")
            return 0
        self.pending |= waiting
        gone = 0
        for name, sent in rows.items():
            try:
                done = {int(i) for i in await providers[name].forget_sent(sent)}
            except Exception as exc:
                done = set()
                log.warning("delivery.remote_copies_failed", provider=name,
                            messages=len(sent), error=f"{type(exc).__name__}: {exc}")
            cleared = [(i, pmid) for i, pmid in sent if i in done]
            self.pending.update(i for i, _ in sent if i not in done)
            if cleared:
                try:
                    await self._clear(cleared)
                except Exception as exc:  # deleted: asking again finds them gone (404)
                    self.pending.update(i for i, _ in cleared)
                    log.warning("delivery.remote_copies_not_cleared", provider=name,
                                messages=len(cleared), error=f"{type(exc).__name__}: {exc}")
                    continue
                gone += len(cleared)
            if len(cleared) < len(sent):
                log.info("delivery.remote_copies_later", provider=name,
                         messages=len(sent) - len(cleared))
        self.deleted += gone
        if gone:
            log.info("delivery.remote_copies_deleted", copies=gone)
        return gone

    async def _rows(self, ids: list[int], names: list[str]
                    ) -> tuple[dict[str, list[tuple[int, str]]], set[int]]:
        """The (id, provider id) pairs to delete, by provider; and the ids still being
        sent (their provider id is not known yet)."""
        m = messages
        rows: dict[str, list[tuple[int, str]]] = {}
        waiting: set[int] = set()
        async with self.k.store.connect() as conn:
            for at in range(0, len(ids), CHUNK):
                for i, provider, pmid, status in await conn.execute(
                        sa.select(m.c.id, m.c.provider, m.c.provider_message_id, m.c.status)
                        .where(m.c.id.in_(ids[at:at + CHUNK]), m.c.user_id.is_(None),
                               sa.or_(m.c.status == "sending",
                                      m.c.provider.in_(names)))):
                    if pmid:
                        if provider in names:
                            rows.setdefault(str(provider), []).append((int(i), str(pmid)))
                    elif status == "sending":
                        waiting.add(int(i))
        return rows, waiting

    async def _unconfigured(self, ids: list[int], configured: set[str]) -> None:
        """Tell of the forgotten messages sent through a provider no longer configured
        (its lane renamed or removed): their copies stay there, their ids are kept for a
        start that has that provider again."""
        m = messages
        found = 0
        async with self.k.store.connect() as conn:
            for at in range(0, len(ids), CHUNK):
                found += int((await conn.execute(
                    sa.select(sa.func.count()).select_from(m)
                    .where(m.c.id.in_(ids[at:at + CHUNK]), m.c.user_id.is_(None),
                           m.c.provider_message_id.is_not(None),
                           m.c.provider.is_not(None),
                           m.c.provider.not_in(sorted(configured))))).scalar_one())
        if found:
            log.warning("delivery.remote_copies_unknown_provider", messages=found)

    async def _clear(self, cleared: list[tuple[int, str]]) -> None:
        """Forget the provider's id of the messages whose copy is gone."""
        m = messages
        async with self.k.store.begin() as conn:
            await conn.execute(
                sa.update(m).where(m.c.id == sa.bindparam("b_id"),
                                   m.c.provider_message_id == sa.bindparam("b_pmid"))
                .values(provider_message_id=None),
                [{"b_id": i, "b_pmid": pmid} for i, pmid in cleared])
