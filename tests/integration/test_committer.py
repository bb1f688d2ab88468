"""The group committer on a real store (SQLite and MariaDB)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import anyio
import pytest
import sqlalchemy as sa

from segflowd import schema
from segflowd.errors import IngestError, StoreUnavailable
from segflowd.hooks import IngestBatch
from segflowd.ingest import committer as committer_module
from segflowd.ingest.committer import GroupCommitter
from segflowd.ingest.writes import (
    CommitResult,
    EventWrite,
    ForgetWrite,
    LinkWrite,
    UserWrite,
    Write,
)
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 3, 1, 12, 0)


class Sink:
    def __init__(self) -> None:
        self.batches: list[IngestBatch] = []

    def ingested(self, batch: IngestBatch) -> None:
        self.batches.append(batch)


@pytest.fixture
async def committer(store: Store) -> AsyncIterator[tuple[GroupCommitter, Sink]]:
    sink = Sink()
    c = GroupCommitter(store, FakeClock(NOW), [sink])
    async with anyio.create_task_group() as tg:
        await tg.start(c.run)
        yield c, sink
        await c.close()


async def _events(store: Store) -> list[sa.Row[object]]:
    async with store.connect() as conn:
        return list(await conn.execute(sa.select(schema.events).order_by(schema.events.c.id)))


@pytest.mark.parametrize("users_known", [False, True],
                         ids=["new-users", "known-users-events-only-flush"])
async def test_one_bad_request_fails_alone_and_the_rest_of_the_flush_commits(
        store: Store, committer: tuple[GroupCommitter, Sink], users_known: bool) -> None:
    c, _ = committer
    outcomes: dict[str, object] = {}
    if users_known:  # the flush is then events only (on SQLite: one trip, its own BEGIN)
        await c.submit([UserWrite("u1", {}), UserWrite("u2", {})])

    async def submit(label: str, write: EventWrite) -> None:
        try:
            outcomes[label] = await c.submit([write])
        except IngestError as exc:
            outcomes[label] = exc

    good = EventWrite("ok", {"n": 1}, None, user_id="u1")
    bad = EventWrite("bad", {"n": object()}, None, user_id="u2")  # not JSON: the store refuses
    async with anyio.create_task_group() as tg:
        tg.start_soon(submit, "good", good)
        tg.start_soon(submit, "bad", bad)
    assert isinstance(outcomes["bad"], IngestError)
    assert not isinstance(outcomes["good"], Exception)
    assert [e.name for e in await _events(store)] == ["ok"]
    assert c.statistics().failed_flushes >= 1


async def test_sink_gets_new_events_and_touched_users_after_commit(
        store: Store, committer: tuple[GroupCommitter, Sink]) -> None:
    c, sink = committer
    result = await c.submit([UserWrite("u1", {"a": 1}),
                             EventWrite("e", {}, None, user_id="u1", dedupe_key="k1")])
    again = await c.submit([EventWrite("e", {}, None, user_id="u1", dedupe_key="k1")])
    assert result.duplicates == (False,)
    assert again.duplicates == (True,)
    assert again.event_ids == result.event_ids
    assert len(sink.batches) == 2
    (event,) = sink.batches[0].events
    assert (event.id, event.user_id, event.name, event.received_at) == (
        result.event_ids[0], "u1", "e", NOW)
    assert sink.batches[0].users == frozenset({"u1"})
    # A retry's first try may have been committed with its reply lost: the engines are
    # told again, under the stored id (they dedupe by it).
    (redelivered,) = sink.batches[1].events
    assert (redelivered.id, redelivered.user_id, redelivered.name) == (
        result.event_ids[0], "u1", "e")
    assert c.statistics().events_stored == 1


async def test_link_in_the_same_flush_gives_anonymous_events_to_the_user(
        store: Store, committer: tuple[GroupCommitter, Sink]) -> None:
    c, _ = committer
    await c.submit([EventWrite("visit", {}, None, anonymous_id="a1"),
                    LinkWrite("a1", "u1"),
                    EventWrite("click", {}, None, anonymous_id="a1")])
    assert {(e.name, e.user_id) for e in await _events(store)} == {("visit", "u1"),
                                                                  ("click", "u1")}


async def test_submit_after_close_is_unavailable(
        store: Store, committer: tuple[GroupCommitter, Sink]) -> None:
    c, _ = committer
    await c.close()
    with pytest.raises(StoreUnavailable):
        await c.submit([UserWrite("u1", {})])


async def test_event_after_a_forget_recreates_the_user_row(
        store: Store, committer: tuple[GroupCommitter, Sink]) -> None:
    c, _ = committer
    await c.submit([EventWrite("a", {}, None, user_id="u1")])
    await c.submit([ForgetWrite("u1")])
    await c.submit([EventWrite("b", {}, None, user_id="u1")])
    async with store.connect() as conn:
        ids = [r.id for r in await conn.execute(sa.select(schema.users.c.id))]
    assert ids == ["u1"]
    assert [e.name for e in await _events(store)] == ["b"]


async def test_the_connection_is_kept_while_busy_and_given_back_when_idle(
        store: Store, committer: tuple[GroupCommitter, Sink],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(committer_module, "IDLE_RELEASE", 0.05)
    c, _ = committer
    pool = store.engine.pool
    await c.submit([EventWrite("a", {}, None, user_id="u1")])
    assert pool.checkedout() == 1  # type: ignore[attr-defined]  # QueuePool's count
    await c.submit([EventWrite("b", {}, None, user_id="u1")])
    assert pool.checkedout() == 1  # type: ignore[attr-defined]
    await anyio.sleep(0.5)  # ten times the idle time
    assert pool.checkedout() == 0  # type: ignore[attr-defined]
    await c.submit([EventWrite("c", {}, None, user_id="u1")])  # checked out again
    assert [e.name for e in await _events(store)] == ["a", "b", "c"]


async def test_a_waiter_cancelled_while_waiting_still_has_its_write_committed(
        store: Store, committer: tuple[GroupCommitter, Sink]) -> None:
    c, _ = committer
    scope = anyio.CancelScope()
    queued = anyio.Event()
    kept: list[object] = []

    async def abandoning() -> None:
        with scope:
            queued.set()  # submit queues its writes before it first waits
            await c.submit([EventWrite("abandoned", {}, None, user_id="u1")])
        assert scope.cancelled_caught

    async def patient() -> None:
        kept.append(await c.submit([EventWrite("kept", {}, None, user_id="u2")]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(abandoning)
        tg.start_soon(patient)
        await queued.wait()
        scope.cancel()
    await c.submit([EventWrite("after", {}, None, user_id="u1")])  # the committer goes on
    assert sorted(e.name for e in await _events(store)) == ["abandoned", "after", "kept"]
    assert len(kept) == 1


async def test_an_events_only_flush_waits_for_another_writer_without_stalling_the_loop(
        sqlite_url: str) -> None:
    # On SQLite the flush's BEGIN IMMEDIATE waits for the write lock in the driver's
    # thread. Were it to wait on the event loop, the writer holding the lock could never
    # finish: the flush would fail after busy_timeout with "database is locked".
    store = Store.open(sqlite_url)
    await store.migrate()
    c = GroupCommitter(store, FakeClock(NOW))
    pending_while_locked: list[bool] = []
    results: list[object] = []
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(c.run)
            await c.submit([UserWrite("u1", {})])  # known from now on: events-only flushes
            submitted = anyio.Event()

            async def submit() -> None:
                results.append(await c.submit([EventWrite("late", {}, None, user_id="u1")]))
                submitted.set()

            async with store.begin() as holder:  # BEGIN IMMEDIATE: holds the write lock
                await holder.execute(sa.update(schema.users).values(email="held@example.com"))
                tg.start_soon(submit)
                await anyio.sleep(0.3)  # the loop runs on while the flush waits
                pending_while_locked.append(not submitted.is_set())
            await submitted.wait()
            await c.close()
    finally:
        await store.close()
    assert pending_while_locked == [True]
    assert len(results) == 1
    events = Store.open(sqlite_url)
    try:
        assert [e.name for e in await _events(events)] == ["late"]
    finally:
        await events.close()


async def test_under_load_a_small_flush_waits_for_the_clients_it_just_answered(
        sqlite_url: str) -> None:
    # Client A's write is being committed while B, C and D queue up. Flushing B, C and D
    # at once would leave A for a flush of its own, and the clients would go on in two
    # halves that flush in turn. Under load a small flush waits (up to flush_delay, long
    # here) for the client the last flush just answered: the second flush holds all four.
    store = Store.open(sqlite_url)
    c = GroupCommitter(store, FakeClock(NOW), flush_delay=30.0)
    sizes: list[int] = []
    first_flush_started, release = anyio.Event(), anyio.Event()

    async def commit(groups: list[list[Write]]) -> tuple[list[CommitResult], IngestBatch]:
        sizes.append(len(groups))
        if len(sizes) == 1:
            first_flush_started.set()
            await release.wait()
        return ([CommitResult((0,), (False,), ()) for _ in groups],
                IngestBatch(users=frozenset(), events=()))

    c._commit_once = commit  # type: ignore[method-assign]  # a store that takes its time

    def write(name: str) -> list[Write]:
        return [EventWrite(name, {}, None, user_id=name)]

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(c.run)

            async def client_a() -> None:
                await c.submit(write("a"))
                await anyio.sleep(0.01)  # the answer's way to the client and back
                await c.submit(write("a"))

            async with anyio.create_task_group() as clients:
                clients.start_soon(client_a)
                await first_flush_started.wait()
                for name in "bcd":
                    clients.start_soon(c.submit, write(name))
                for _ in range(10_000):  # until B, C and D are queued
                    if c.statistics().pending == 3:
                        break
                    await anyio.sleep(0.001)
                release.set()
            await c.close()
    finally:
        await store.close()
    assert sizes == [1, 4]
