"""Forgetting a user (issue #24): forget means forgotten, and only that user.

On SQLite and MariaDB: another user's events survive, nothing re-enters the forgotten id,
queued work does not re-create their data, and after ``DELETE /v1/users/{id}`` (the
committer's ``ForgetWrite``) no table holds their id or address but what the docs keep.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from segflowd import schema
from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.config import load_config
from segflowd.delivery.service import DeliveryService
from segflowd.hooks import IngestBatch, StoredEvent
from segflowd.ingest.committer import GroupCommitter
from segflowd.ingest.users import FORGOTTEN, TOMBSTONE_PREFIX, forget_user
from segflowd.ingest.writes import ForgetWrite
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.providers import OutgoingMessage
from segflowd.segments.transactions import TransactionService
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 3, 1, 12, 0)
UID = "zed-4711"
EMAIL = "Zed.Secret@example.com"
# What the docs (guides/operating.md, "Forgetting a user") keep on purpose: the suppression of
# the address, so a bounced or complaining address is never mailed again.
KEPT = {"suppressions"}


async def _user(conn: AsyncConnection, uid: str,
                email: str | None = None) -> None:
    await conn.execute(sa.insert(schema.users).values(
        id=uid, email=email, attributes={"email": email} if email else {},
        created_at=NOW, updated_at=NOW))


async def _event(conn: AsyncConnection, uid: str | None, anon: str | None,
                 name: str, **attributes: object) -> int:
    return _pk(await conn.execute(sa.insert(schema.events).values(
        user_id=uid, anonymous_id=anon, name=name, attributes=attributes,
        created_at=NOW, received_at=NOW)))


def _pk(result: sa.CursorResult[object]) -> int:
    pk = result.inserted_primary_key
    assert pk is not None
    return int(pk[0])


async def test_forgetting_a_user_keeps_another_users_events_under_a_shared_anonymous_id(
        store: Store) -> None:
    """u1 and u2 used one browser: forgetting u2 deletes u2's and still-anonymous events
    under it, never u1's."""
    ev, al = schema.events, schema.anonymous_links
    async with store.begin() as conn:
        await _user(conn, "u1")
        await _user(conn, "u2")
        await _event(conn, "u1", "browser", "u1-visit")  # given to u1 by an identify
        await _event(conn, "u2", "browser", "u2-visit")  # the id later linked to u2
        await _event(conn, None, "browser", "still-anonymous")
        await _event(conn, "u1", None, "u1-own")
        await conn.execute(sa.insert(al).values(anonymous_id="browser", user_id="u2",
                                                linked_at=NOW))
    async with store.begin() as conn:
        assert await forget_user(conn, "u2", NOW)
    async with store.connect() as conn:
        left = sorted(n for (n,) in await conn.execute(sa.select(ev.c.name)))
    assert left == ["u1-own", "u1-visit"]


async def test_forget_deletes_audience_memberships(store: Store) -> None:
    """An audience segment (``SELECT user_id FROM audience_members``) cannot bring the
    forgotten id back at its next refresh; other members stay."""
    am = schema.audience_members
    async with store.begin() as conn:
        await _user(conn, "u1")
        await _user(conn, "u2")
        await conn.execute(sa.insert(am), [
            {"audience": "vip", "user_id": u, "joined_at": NOW} for u in ("u1", "u2")])
    async with store.begin() as conn:
        assert await forget_user(conn, "u1", NOW)
    async with store.connect() as conn:
        assert [u for (u,) in await conn.execute(sa.select(am.c.user_id))] == ["u2"]


def _tx_app() -> Segflow:
    app = Segflow(templates="templates")
    app.template("receipt", subject="Receipt", html="receipt.html")
    app.transaction("receipt", event="purchase", template="receipt")
    return app


async def test_a_transaction_queued_before_the_forget_does_not_recreate_the_user_data(
        store: Store, tmp_path: Path) -> None:
    """The event was handed to transactions, then the user was forgotten before the
    worker ran: no message row with their id and the event's payload is made."""
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                    '[providers.outbox]\nplugin = "outbox"\n')
    kernel = Kernel(config=load_config(path, environ={}), app=_tx_app(), store=store,
                    clock=FakeClock(NOW), bus=Bus(), metrics=Metrics())
    tx = TransactionService(kernel)
    await tx.start()
    async with store.begin() as conn:
        await _user(conn, "ann", "ann@example.com")
        eid = await _event(conn, "ann", None, "purchase", card="4242")
    tx.ingested(IngestBatch(users=frozenset({"ann"}), events=(StoredEvent(
        id=eid, user_id="ann", anonymous_id=None, name="purchase",
        attributes={"card": "4242"}, created_at=NOW, received_at=NOW),)))
    async with store.begin() as conn:
        assert await forget_user(conn, "ann", NOW)
    await tx.process_pending()
    async with store.connect() as conn:
        rows = (await conn.execute(sa.select(schema.messages))).all()
    assert rows == []
    assert tx.statistics().forgotten == 1


@dataclasses.dataclass
class Seeded:
    instances: list[int]
    messages: list[int]


async def _seed_everything(store: Store) -> Seeded:
    """The user in every table that can name them, and one other user beside them."""
    s = schema
    async with store.begin() as conn:
        await _user(conn, UID, EMAIL)
        await _user(conn, "other", "other@example.com")
        eid = await _event(conn, UID, "anon-zed", "signup", email=EMAIL)
        await _event(conn, None, "anon-zed", "$page", url=f"/?u={UID}")
        await _event(conn, "other", None, "signup", email="other@example.com")
        await conn.execute(sa.insert(s.anonymous_links).values(
            anonymous_id="anon-zed", user_id=UID, linked_at=NOW))
        await conn.execute(sa.insert(s.segment_members).values(
            segment="all", user_id=UID, entered_at=NOW, evaluated_at=NOW))
        await conn.execute(sa.insert(s.segment_changes).values(
            segment="all", user_id=UID, entered=True, at=NOW))
        await conn.execute(sa.insert(s.subscriptions).values(
            user_id=UID, topic="marketing", unsubscribed_at=NOW, updated_at=NOW))
        await conn.execute(sa.insert(s.audience_members).values(
            audience="vip", user_id=UID, joined_at=NOW))
        bid = _pk(await conn.execute(sa.insert(s.broadcasts).values(
            name="spring", campaign="promo", segment="all", rate=10.0, status="running",
            after=UID, total=2, done=1, created_at=NOW, updated_at=NOW)))
        fi = s.flow_instances
        instances: list[int] = []
        for campaign, live, key in (("welcome", None, None), ("promo", 1, f"bc:{bid}:{UID}")):
            done = await conn.execute(sa.insert(fi).values(
                campaign=campaign, user_id=UID, version="v1",
                status="failed" if live is None else "waiting", live=live, seq=1,
                wait_event="purchase" if live else None, entry_event_id=eid,
                start_key=key, start_data={"coupon_for": EMAIL},
                error=f"KeyError: {EMAIL!r}" if live is None else None,
                created_at=NOW, updated_at=NOW))
            iid = _pk(done)
            instances.append(iid)
            await conn.execute(sa.insert(s.flow_journal).values(
                instance_id=iid, seq=0, kind="send", name="hello", args_hash="x",
                result={"to": EMAIL}, reads={"user.email": EMAIL}, created_at=NOW))
        m = s.messages
        msgs: list[int] = []
        for kind, status, key in (("campaign", "sent", f"flow:{instances[0]}:0"),
                                  ("broadcast", "failed", f"bc:{bid}:{UID}"),
                                  ("transaction", "queued", f"tx:{eid}:receipt")):
            done = await conn.execute(sa.insert(m).values(
                user_id=UID, kind=kind, template="hello", to_address=EMAIL,
                data={"event": {"attributes": {"email": EMAIL}}}, status=status,
                provider="outbox", provider_message_id=f"0000000{len(msgs) + 1}-x.eml",
                message_id=f"{len(msgs) + 1}.abc@mail.example.com",
                last_error=f"550 5.1.1 <{EMAIL}>: mailbox unavailable",
                dedupe_key=key, created_at=NOW, updated_at=NOW))
            msgs.append(_pk(done))
        await conn.execute(sa.insert(s.engagement).values(
            message_id=msgs[0], user_id=UID, kind="click",
            url=f"https://shop.example.com/account?email={EMAIL}&id={UID}", created_at=NOW))
        await conn.execute(sa.insert(s.suppressions).values(
            address=EMAIL.lower(), reason="bounce", source="outbox",
            detail=f"550 5.1.1 <{EMAIL}>", created_at=NOW))
    return Seeded(instances, msgs)


async def _mentions(store: Store) -> dict[str, list[str]]:
    """table.column → the values that mention UID or EMAIL (case-insensitively)."""
    needles = (UID.lower(), EMAIL.lower())
    found: dict[str, list[str]] = {}
    async with store.connect() as conn:
        for table in schema.metadata.sorted_tables:
            cols = [c for c in table.columns
                    if isinstance(c.type, sa.String | sa.Text | sa.JSON)
                    or "JSON" in type(c.type).__name__]
            if not cols:
                continue
            for row in await conn.execute(sa.select(*cols)):
                for col, value in zip(cols, row, strict=True):
                    text = str(value).lower()
                    if value is not None and any(n in text for n in needles):
                        found.setdefault(f"{table.name}.{col.name}", []).append(str(value))
    return found


@pytest.fixture
async def committer(store: Store) -> AsyncIterator[GroupCommitter]:
    c = GroupCommitter(store, FakeClock(NOW), [])
    async with anyio.create_task_group() as tg:
        await tg.start(c.run)
        yield c
        await c.close()


async def test_after_delete_user_only_the_documented_suppression_names_them(
        store: Store, committer: GroupCommitter) -> None:
    """Every string and JSON column of every table is searched for the id and the
    address: only the suppression row (kept on purpose) still has them."""
    seeded = await _seed_everything(store)
    before = {name.split(".")[0] for name in await _mentions(store)}
    assert before > KEPT | {"users", "flow_instances", "messages"}  # the search works
    result = await committer.submit([ForgetWrite(UID)])
    assert result.forgotten == (True,)
    found = await _mentions(store)
    assert {name.split(".")[0] for name in found} == KEPT, found
    s = schema
    async with store.connect() as conn:
        fi = (await conn.execute(sa.select(s.flow_instances)
                                 .order_by(s.flow_instances.c.id))).all()
        msgs = (await conn.execute(sa.select(s.messages).order_by(s.messages.c.id))).all()
        others = (await conn.execute(sa.select(s.events.c.user_id))).all()
    # Campaign counts stay true: the instances and messages are kept, under one tombstone.
    assert [r.id for r in fi] == seeded.instances
    assert [r.status for r in fi] == ["failed", "exited"]
    tombs = {r.user_id for r in fi}
    assert len(tombs) == 1
    assert next(iter(tombs)).startswith(TOMBSTONE_PREFIX)
    assert [r.live for r in fi] == [None, None]
    assert [r.id for r in msgs] == seeded.messages
    assert [r.status for r in msgs] == ["sent", "failed", "failed"]  # queued work dropped
    assert [r.user_id for r in msgs] == [None, None, None]
    assert [r.last_error for r in msgs] == [None, None, FORGOTTEN]
    assert others == [("other",)]


async def test_a_user_who_signs_up_again_under_the_same_id_has_no_old_instances(
        store: Store, committer: GroupCommitter) -> None:
    """The instances are kept under a tombstone, so a static campaign (one instance per
    user, ever) can start again for the new user of that id."""
    await _seed_everything(store)
    await committer.submit([ForgetWrite(UID)])
    fi = schema.flow_instances
    async with store.connect() as conn:
        mine = (await conn.execute(sa.select(sa.func.count()).select_from(fi)
                                   .where(fi.c.user_id == UID))).scalar_one()
    assert mine == 0


def _delivery(store: Store, tmp_path: Path) -> DeliveryService:
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
                    'from = "Shop <shop@example.com>"\n'
                    '[providers.outbox]\nplugin = "outbox"\npath = "outbox"\n')
    kernel = Kernel(config=load_config(path, environ={}), app=_tx_app(), store=store,
                    clock=FakeClock(NOW), bus=Bus(), metrics=Metrics())
    return DeliveryService(kernel)


async def _sent_files(delivery: DeliveryService, seeded: Seeded) -> Path:
    """What the outbox provider writes for the user's sent message, and another user's."""
    outgoing = [OutgoingMessage(id=i, message_id=f"{i}.abc@mail.example.com",
                                sender="shop@example.com", to=to, subject="Hello",
                                mime=f"To: {to}\r\n\r\nHi {to}".encode())
                for i, to in ((seeded.messages[0], EMAIL), (9999, "other@example.com"))]
    assert all(r.ok for r in await delivery.provider.send(outgoing))
    folder = delivery.k.config.base_dir / "outbox"
    assert sum(EMAIL.encode() in f.read_bytes() for f in folder.iterdir()) == 1
    return folder


async def test_after_delete_user_the_outbox_files_of_their_messages_are_gone(
        store: Store, committer: GroupCommitter, tmp_path: Path) -> None:
    """The outbox provider keeps each sent message as a file: the forget deletes the
    user's (told by the ingest batch) and leaves everyone else's."""
    seeded = await _seed_everything(store)
    delivery = _delivery(store, tmp_path)
    folder = await _sent_files(delivery, seeded)
    committer.sinks = [delivery]
    await committer.submit([ForgetWrite(UID)])
    assert await delivery.copies.forget_now() == 1
    left = [f.read_bytes() for f in folder.iterdir()]
    assert len(left) == 1
    assert b"other@example.com" in left[0]
    assert not any(EMAIL.lower().encode() in b.lower() for b in left)


async def test_outbox_files_a_crash_kept_after_a_forget_go_at_the_next_start(
        store: Store, committer: GroupCommitter, tmp_path: Path) -> None:
    seeded = await _seed_everything(store)
    delivery = _delivery(store, tmp_path)
    folder = await _sent_files(delivery, seeded)
    await committer.submit([ForgetWrite(UID)])  # delivery was not told: the process died
    assert len(list(folder.iterdir())) == 2
    again = _delivery(store, tmp_path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(again.copies.run)  # the start's sweep
        for _ in range(500):
            if again.copies.deleted:
                break
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert again.copies.deleted == 1
    assert [b"other@example.com" in f.read_bytes() for f in folder.iterdir()] == [True]
