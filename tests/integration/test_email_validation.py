"""Email addresses at ingest (#18, delivery): normalised and checked without DNS; a user
with an invalid address is stored, ``GET /v1/users/{id}`` says what is wrong
(``email_error``), and delivery fails their messages without handing them to the provider.

The ingest app runs on a real store (SQLite and MariaDB) through httpx.ASGITransport with
its group committer; delivery runs on the same kernel with a provider that records every
message it is handed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
import sqlalchemy as sa
from delivery_harness import ScriptedProvider, Setup, make_kernel, message_row, service

from segflowd import schema
from segflowd.delivery.outbox import enqueue
from segflowd.http import Router
from segflowd.ingest.service import IngestService
from segflowd.store import Store

pytestmark = pytest.mark.anyio

API_KEY = "validation-test-key"
KEYS = f'\n[[http.keys]]\nname = "site"\nsecret = "{API_KEY}"\n'
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclasses.dataclass
class Harness:
    http: httpx.AsyncClient
    setup: Setup

    async def put(self, uid: str, attributes: dict[str, object]) -> None:
        r = await self.http.put(f"/v1/users/{uid}", headers=AUTH,
                                json={"attributes": attributes})
        assert r.status_code == 200, r.text  # acknowledged, whatever the address
        assert r.json() == {"id": uid, "ok": True}

    async def get(self, uid: str) -> dict[str, object]:
        r = await self.http.get(f"/v1/users/{uid}", headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body, dict)
        return body


@pytest.fixture
async def h(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    setup = make_kernel(store, tmp_path, email_extra=KEYS)
    ingest = IngestService(setup.kernel)
    router = Router()
    ingest.register_routes(router)
    async with anyio.create_task_group() as tg:
        await tg.start(ingest.run)
        transport = httpx.ASGITransport(app=router)
        async with httpx.AsyncClient(transport=transport, base_url="http://segflow") as http:
            yield Harness(http, setup)
        await ingest.drain()


async def test_valid_addresses_are_normalised_at_ingest(h: Harness) -> None:
    await h.put("u1", {"email": "  Ann.Lee@Example.ORG ", "name": "Ann"})
    await h.put("u2", {"email": "x@Bücher.Example"})
    ann, idn = await h.get("u1"), await h.get("u2")
    assert (ann["email"], ann["email_error"]) == ("Ann.Lee@example.org", None)
    assert ann["attributes"] == {"email": "  Ann.Lee@Example.ORG ", "name": "Ann"}
    assert (idn["email"], idn["email_error"]) == ("x@bücher.example", None)
    async with h.setup.kernel.store.connect() as conn:
        stored = dict((await conn.execute(sa.select(schema.users.c.id, schema.users.c.email)
                                          .where(schema.users.c.id.in_(["u1", "u2"])))).all())
    assert stored == {"u1": "Ann.Lee@example.org", "u2": "x@bücher.example"}


@pytest.mark.parametrize(("address", "why"), [
    ("ann@example", "period"),
    ("ann..lee@example.com", "two periods"),
    ("not an address", "@-sign"),
    ("Ann <ann@exa mple.com>", "not a valid email address"),
])
async def test_an_invalid_address_is_stored_and_get_user_says_why(
        h: Harness, address: str, why: str) -> None:
    await h.put("bad", {"email": address, "name": "Eve"})
    user = await h.get("bad")
    assert user["email"] == address  # stored as written: the user is not lost
    assert isinstance(user["email_error"], str)
    assert "not a valid email address" in user["email_error"]
    assert why in user["email_error"]


async def test_an_email_attribute_that_is_not_text_is_reported(h: Harness) -> None:
    await h.put("num", {"email": 12345})
    user = await h.get("num")
    assert user["email"] is None
    assert user["email_error"] == "the email attribute is not a string"
    await h.put("none", {"name": "No Address"})
    assert (await h.get("none"))["email_error"] is None  # no address is not an error


async def test_no_send_is_attempted_to_a_user_with_an_invalid_address(h: Harness) -> None:
    await h.put("good", {"email": "Ann@Example.org", "name": "Ann"})
    await h.put("bad", {"email": "eve@example", "name": "Eve"})
    await h.put("worse", {"email": "eve..x@example.com", "name": "Eve"})
    ids = {}
    async with h.setup.kernel.store.begin() as conn:
        for uid in ("good", "bad", "worse"):
            ids[uid] = await enqueue(conn, kind="campaign", template="welcome",
                                     now=h.setup.clock.now(), user_id=uid, dedupe_key=None,
                                     data={"plan": "pro"}, campaign="onboarding")
    provider = ScriptedProvider()
    svc = service(h.setup, provider)
    assert await svc.run_once() == 3
    assert [m.to for m in provider.sent] == ["Ann@example.org"]  # the others never went
    assert provider.calls == 1
    good = await message_row(h.setup.kernel.store, ids["good"])
    assert good["status"] == "sent"
    for uid in ("bad", "worse"):
        row = await message_row(h.setup.kernel.store, ids[uid])
        assert row["status"] == "failed", uid
        assert "not a valid email address" in row["last_error"], uid
    async with h.setup.kernel.store.connect() as conn:
        held = schema.messages.c.status.in_(("claimed", "sending"))
        left = (await conn.execute(sa.select(sa.func.count()).select_from(schema.messages)
                                   .where(held))).scalar()
    assert left == 0
