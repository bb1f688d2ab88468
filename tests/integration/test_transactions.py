"""Transactions on real stores (SQLite and MariaDB): once per (event, transaction), sent to
unsubscribed users, never to suppressed addresses, and caught up after a restart."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import select

from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.cursors import load_cursor
from segflowd.hooks import IngestBatch, StoredEvent
from segflowd.ingest.committer import GroupCommitter
from segflowd.ingest.users import forget_user
from segflowd.ingest.writes import EventWrite
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import events, messages, subscriptions, suppressions, users
from segflowd.segments import transactions
from segflowd.segments.transactions import NO_EMAIL, TransactionService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 3, 1, 12, 0, 0)


def make_app() -> Segflow:
    app = Segflow(templates="templates")
    app.template("password-reset", subject="Reset", html="password-reset.html")
    app.template("security-notice", subject="Security", html="security.html")
    app.template("receipt", subject="Receipt", html="receipt.html")
    app.transaction("password-reset", event="reset_password_requested",
                    template="password-reset")
    app.transaction("security-notice", event="reset_password_requested",
                    template="security-notice")
    app.transaction("receipt", event="purchase", template="receipt")
    return app


class Waker:
    def __init__(self) -> None:
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


@dataclasses.dataclass
class H:
    store: Store
    clock: FakeClock
    kernel: Kernel
    waker: Waker
    tx: TransactionService

    async def user(self, uid: str, email: str | None) -> None:
        async with self.store.begin() as conn:
            await conn.execute(sa.insert(users).values(
                id=uid, email=email, attributes={}, created_at=NOW, updated_at=NOW))

    async def event(self, uid: str | None, name: str, **attributes: object) -> IngestBatch:
        async with self.store.begin() as conn:
            res = await conn.execute(sa.insert(events).values(
                user_id=uid, anonymous_id=None if uid else "anon-1", name=name,
                attributes=attributes, created_at=NOW, received_at=NOW))
        pk = res.inserted_primary_key
        assert pk is not None
        e = StoredEvent(id=int(pk[0]), user_id=uid, anonymous_id=None if uid else "anon-1",
                        name=name, attributes=attributes, created_at=NOW, received_at=NOW)
        return IngestBatch(users=frozenset({uid} if uid else ()), events=(e,))

    async def messages(self) -> list[sa.Row[tuple[object, ...]]]:
        async with self.store.connect() as conn:
            return list((await conn.execute(
                select(messages.c.user_id, messages.c.transaction, messages.c.template,
                       messages.c.status, messages.c.kind, messages.c.dedupe_key,
                       messages.c.data, messages.c.last_error)
                .order_by(messages.c.id))).all())


def kernel_for(store: Store, app: Segflow, clock: FakeClock, tmp_path: Path) -> Kernel:
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                    '[providers.outbox]\nplugin = "outbox"\n')
    return Kernel(config=load_config(path, environ={}), app=app, store=store, clock=clock,
                  bus=Bus(), metrics=Metrics())


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> H:
    clock = FakeClock(NOW)
    kernel = kernel_for(store, make_app(), clock, tmp_path)
    waker = Waker()
    tx = TransactionService(kernel, wakers=[waker])
    await tx.start()
    return H(store, clock, kernel, waker, tx)


async def test_each_matching_transaction_is_enqueued_once_per_event_even_if_handed_twice(
        h: H) -> None:
    await h.user("ann", "ann@example.com")
    batch = await h.event("ann", "reset_password_requested", ip="10.0.0.1")
    h.tx.ingested(batch)
    h.tx.ingested(batch)  # the same commit handed over twice
    await h.tx.process_pending()
    await h.tx.process(batch.events)  # and again, as a catch-up would
    rows = await h.messages()
    eid = batch.events[0].id
    assert [(r.transaction, r.status, r.kind, r.dedupe_key) for r in rows] == [
        ("password-reset", "queued", "transaction", f"tx:{eid}:password-reset"),
        ("security-notice", "queued", "transaction", f"tx:{eid}:security-notice"),
    ]
    assert rows[0].data["event"]["name"] == "reset_password_requested"  # type: ignore[index]
    assert rows[0].data["event"]["attributes"] == {"ip": "10.0.0.1"}  # type: ignore[index]
    assert h.waker.woken >= 1
    assert h.tx.statistics().duplicates == 4


async def test_unsubscribed_user_still_gets_transactional_mail(h: H) -> None:
    await h.user("bo", "bo@example.com")
    async with h.store.begin() as conn:
        await conn.execute(sa.insert(subscriptions).values(
            user_id="bo", topic="marketing", unsubscribed_at=NOW, updated_at=NOW))
    h.tx.ingested(await h.event("bo", "purchase", amount=10))
    await h.tx.process_pending()
    assert [(r.user_id, r.transaction, r.status) for r in await h.messages()] == [
        ("bo", "receipt", "queued")]


async def test_suppressed_address_is_recorded_as_suppressed_not_queued(h: H) -> None:
    await h.user("cy", "Cy@Example.com")
    async with h.store.begin() as conn:
        await conn.execute(sa.insert(suppressions).values(
            address="cy@example.com", reason="bounce", created_at=NOW))
    h.tx.ingested(await h.event("cy", "purchase", amount=10))
    await h.tx.process_pending()
    rows = await h.messages()
    assert [(r.transaction, r.status) for r in rows] == [("receipt", "suppressed")]
    assert "suppressed" in str(rows[0].last_error)
    assert h.waker.woken == 0  # nothing for delivery to do
    assert h.tx.statistics().suppressed == 1


async def test_user_without_email_gets_a_failed_row_saying_so(h: H) -> None:
    await h.user("di", None)
    h.tx.ingested(await h.event("di", "purchase"))
    await h.tx.process_pending()
    assert [(r.status, r.last_error) for r in await h.messages()] == [("failed", NO_EMAIL)]


async def test_events_committed_while_down_are_processed_at_start_but_history_is_not(
        h: H, tmp_path: Path) -> None:
    await h.user("ed", "ed@example.com")
    await h.tx.process((await h.event("ed", "purchase")).events)
    missed = await h.event("ed", "reset_password_requested")  # committed, never handed over
    again = TransactionService(h.kernel, wakers=[h.waker])
    await again.start()
    rows = await h.messages()
    assert [(r.transaction, r.dedupe_key) for r in rows] == [
        ("receipt", f"tx:{missed.events[0].id - 1}:receipt"),
        ("password-reset", f"tx:{missed.events[0].id}:password-reset"),
        ("security-notice", f"tx:{missed.events[0].id}:security-notice"),
    ]
    # A store this service never ran against: its history is not re-sent.
    async with h.store.begin() as conn:
        await conn.execute(sa.text("DELETE FROM engine_cursors"))
    await h.event("ed", "purchase")
    fresh = TransactionService(h.kernel)
    await fresh.start()
    assert len(await h.messages()) == 3


async def test_anonymous_events_send_nothing(h: H) -> None:
    h.tx.ingested(await h.event(None, "purchase"))
    await h.tx.process_pending()
    assert await h.messages() == []
    assert h.tx.statistics().no_user == 1


async def _stored_cursor(store: Store) -> int | None:
    async with store.connect() as conn:
        cursor = await load_cursor(conn, "transactions")
    return None if cursor is None else cursor.last_event_id


async def test_events_matching_nothing_move_the_cursor_at_most_once_a_second(
        h: H, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transactions, "SAVE_INTERVAL", 0.2)
    await h.user("fay", "fay@example.com")
    first = await h.event("fay", "page_viewed")
    h.tx.ingested(first)
    await h.tx.process_pending()  # the first save is not put off
    assert await _stored_cursor(h.store) == first.events[0].id
    later = [await h.event("fay", "page_viewed") for _ in range(3)]
    for batch in later:  # no write transaction per batch of events nobody waits for
        h.tx.ingested(batch)
        await h.tx.process_pending()
    assert await _stored_cursor(h.store) == first.events[0].id
    async with anyio.create_task_group() as tg:  # the worker saves it after the interval
        await tg.start(h.tx.run)
        for _ in range(2000):
            if await _stored_cursor(h.store) == later[-1].events[0].id:
                break
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert await _stored_cursor(h.store) == later[-1].events[0].id
    last = await h.event("fay", "page_viewed")
    h.tx.ingested(last)
    await h.tx.drain()  # a shutdown saves it at once
    assert await _stored_cursor(h.store) == last.events[0].id
    # A matching event still moves the cursor in its own transaction, put off or not.
    await h.tx.process((await h.event("fay", "purchase")).events)
    assert await _stored_cursor(h.store) == last.events[0].id + 1


async def test_a_retry_of_an_event_whose_reply_was_lost_still_sends_its_mail(
        h: H, store: Store) -> None:
    """#23.9: the first try committed but the client heard 503 and the engines were never
    told; later events moved the cursor on. The client's retry is a duplicate, and the
    engines are told of it again under its stored id, so the mail still goes (once)."""
    await h.user("u1", "u1@example.com")
    await h.user("u2", "u2@example.com")
    async with store.begin() as conn:  # the first try: committed, the reply lost
        await conn.execute(sa.insert(events).values(
            user_id="u1", name="reset_password_requested", attributes={},
            dedupe_key="msg-1", created_at=NOW, received_at=NOW))
    c = GroupCommitter(store, h.clock, [h.tx])
    async with anyio.create_task_group() as tg:
        await tg.start(c.run)
        await c.submit([EventWrite("purchase", {}, None, user_id="u2")])  # moves the cursor
        await h.tx.process_pending()
        retry = await c.submit([EventWrite("reset_password_requested", {}, None,
                                           user_id="u1", dedupe_key="msg-1")])
        assert retry.duplicates == (True,)
        await h.tx.process_pending()
        again = await c.submit([EventWrite("reset_password_requested", {}, None,
                                           user_id="u1", dedupe_key="msg-1")])
        assert again.duplicates == (True,)
        await h.tx.process_pending()
        await c.close()
    sent = sorted((str(m.template), str(m.user_id)) for m in await h.messages())
    assert sent == [("password-reset", "u1"), ("receipt", "u2"), ("security-notice", "u1")]


async def test_a_replay_of_old_events_sends_no_mail_for_them_again(
        h: H, store: Store) -> None:
    """Review round 3: duplicates reached the engines again however old their first
    copy, so a replay or backfill of past events queued receipts for past purchases. Only
    a retry of an event stored within REDELIVER_WINDOW is news."""
    await h.user("u1", "u1@example.com")
    past = NOW - dt.timedelta(days=30)
    async with store.begin() as conn:  # stored a month ago, before the receipt existed
        await conn.execute(sa.insert(events).values(
            user_id="u1", name="purchase", attributes={}, dedupe_key="order-42",
            created_at=past, received_at=past))
    c = GroupCommitter(store, h.clock, [h.tx])
    async with anyio.create_task_group() as tg:
        await tg.start(c.run)
        replay = await c.submit([EventWrite("purchase", {}, past, user_id="u1",
                                            dedupe_key="order-42")])
        assert replay.duplicates == (True,)
        await h.tx.process_pending()
        await c.close()
    assert await h.messages() == []


async def test_an_event_of_a_forgotten_user_never_mails_a_new_user_of_the_same_id(
        h: H) -> None:
    """Queued before a forget, processed after someone else signed up under the same id:
    the event was the old user's (the forget deleted it), so nothing is sent."""
    await h.user("ann", "ann@example.com")
    batch = await h.event("ann", "reset_password_requested", token="secret-1")
    h.tx.ingested(batch)
    async with h.store.begin() as conn:
        assert await forget_user(conn, "ann", NOW)
    await h.user("ann", "someone-else@example.com")
    await h.tx.process_pending()
    assert await h.messages() == []
    assert h.tx.statistics().forgotten == 2
