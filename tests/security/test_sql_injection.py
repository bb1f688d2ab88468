"""SQL injection payloads change nothing: they are stored and matched as plain data.

Through every ingest API (user ids in the path and in bodies, event names, attribute
keys and values, dedupe ids), the native read and delete, and the control socket, on
SQLite and MariaDB; and through data-source placeholders, quoted and bare, on
PostgreSQL and MariaDB customer databases.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import anyio
import pytest
import sqlalchemy as sa
from anyio.streams.buffered import BufferedByteReceiveStream
from asgi_daemon import Reply, asgi_call, assert_sane, running
from customer_db import source_for
from daemon_harness import API_SECRET

from segflowd import schema
from segflowd.control.protocol import unix_address
from segflowd.daemon import Daemon
from segflowd.errors import SourceError

pytestmark = pytest.mark.anyio

# Distinct even where ids compare without case (MariaDB's default collation).
PAYLOADS = [
    "x'; DROP TABLE users; --",
    "' OR '1'='1",
    "'; DELETE FROM events; --",
    '"; DROP TABLE events; --',
    "1; UPDATE users SET attributes = '{}'",
    "u1' --",
    "%' OR 1=1 #",
    "\\'; TRUNCATE users; --",
    "') OR ('a'='a",
    "*/ DROP TABLE segment_members /*",
    "$1 :id ? %s {0}",
    "ユーザー' OR ''='",
]
BEARER = [(b"authorization", f"Bearer {API_SECRET}".encode()),
          (b"content-type", b"application/json")]
SEGMENT = [(b"authorization", b"Basic " + base64.b64encode(f"{API_SECRET}:".encode())),
           (b"content-type", b"application/json")]
CIO = [(b"authorization", b"Basic " + base64.b64encode(f"default:{API_SECRET}".encode())),
       (b"content-type", b"application/json")]


async def call(d: Daemon, method: str, path: str, headers: list[tuple[bytes, bytes]],
               doc: object = None) -> Reply:
    body = b"" if doc is None else json.dumps(doc).encode()
    reply = await asgi_call(d.router, method, path.encode(), headers, body)
    assert_sane(reply, (method, path))
    return reply


def user_path(uid: str, suffix: str = "") -> str:
    return f"/v1/users/{quote(uid, safe='')}{suffix}"


async def table_names(d: Daemon) -> list[str]:
    async with d.store.connect() as conn:
        return sorted(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))


async def select(d: Daemon, stmt: sa.Select[tuple[object, ...]]) -> list[sa.Row[object]]:
    async with d.store.connect() as conn:
        return list(await conn.execute(stmt))


async def control_user(d: Daemon, uid: str) -> dict[str, object]:
    with unix_address(d.config.daemon.control_socket) as address:
        async with await anyio.connect_unix(address) as s:
            reader = BufferedByteReceiveStream(s)
            await reader.receive_until(b"\n", 1 << 20)  # hello
            await s.send(json.dumps({"id": 1, "op": "user", "args": {"id": uid}}).encode()
                         + b"\n")
            return dict(json.loads(await reader.receive_until(b"\n", 1 << 24)))


@pytest.fixture
async def daemon(store_url: str, tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running(tmp_path / "d", store_url) as d:
        yield d


async def test_payloads_through_every_ingest_api_are_stored_as_plain_data(
        daemon: Daemon) -> None:
    d = daemon
    by = await call(d, "PUT", user_path("bystander"), BEARER,
                    {"attributes": {"email": "by@example.com", "plan": "gold"}})
    assert by.status == 200
    assert (await call(d, "POST", user_path("bystander", "/events"), BEARER,
                       {"name": "login"})).status == 202
    tables = await table_names(d)
    assert "users" in tables
    assert "events" in tables

    for p in PAYLOADS:
        # native: the id in the path, the payload as event name, attribute key and value
        assert (await call(d, "PUT", user_path(p), BEARER,
                           {"attributes": {p: p, "note": p}})).status == 200
        assert (await call(d, "POST", user_path(p, "/events"), BEARER,
                           {"name": p, "attributes": {p: p}, "id": p})).status == 202
        # Segment: ids, event name, properties, messageId in the body
        assert (await call(d, "POST", "/v1/track", SEGMENT,
                           {"userId": p + "-s", "event": p, "properties": {p: p},
                            "messageId": p})).status == 200
        assert (await call(d, "POST", "/v1/alias", SEGMENT,
                           {"previousId": p + "-anon", "userId": p + "-s"})).status == 200
        # Customer.io: the id in the path, attributes and event data in the body
        assert (await call(d, "PUT", f"/api/v1/customers/{quote(p + '-c', safe='')}", CIO,
                           {p: p})).status == 200
        assert (await call(d, "POST", f"/api/v1/customers/{quote(p + '-c', safe='')}/events",
                           CIO, {"name": p, "data": {p: p}, "id": p})).status == 200

    assert await table_names(d) == tables
    u, ev = schema.users, schema.events
    ids = sorted(r.id for r in await select(d, sa.select(u.c.id)))
    assert ids == sorted(["bystander", *PAYLOADS, *(p + "-s" for p in PAYLOADS),
                          *(p + "-c" for p in PAYLOADS)])
    for p in PAYLOADS:
        got = await call(d, "GET", user_path(p), BEARER)
        assert got.status == 200
        assert got.json()["id"] == p
        assert got.json()["attributes"] == {p: p, "note": p}
        for owner, attributes in ((p, {p: p}), (p + "-c", {p: p})):
            rows = await select(d, sa.select(ev.c.name, ev.c.attributes)
                                .where(ev.c.user_id == owner))
            assert [(r.name, r.attributes) for r in rows] == [(p, attributes)]
        (segment_event,) = await select(d, sa.select(ev.c.name, ev.c.attributes)
                                        .where(ev.c.user_id == p + "-s"))
        assert segment_event.name == p
        assert segment_event.attributes == {p: p}
        (link,) = await select(d, sa.select(schema.anonymous_links.c.user_id).where(
            schema.anonymous_links.c.anonymous_id == p + "-anon"))
        assert link.user_id == p + "-s"
        reply = await control_user(d, p)
        assert reply["ok"] is True
        assert reply["result"]["id"] == p  # type: ignore[index]
    # The same event id again is a duplicate of that user's event, nobody else's.
    again = await call(d, "POST", user_path(PAYLOADS[1], "/events"), BEARER,
                       {"name": "again", "id": PAYLOADS[1]})
    assert again.json()["duplicate"] is True
    bystander = await call(d, "GET", user_path("bystander"), BEARER)
    assert bystander.json()["attributes"] == {"email": "by@example.com", "plan": "gold"}
    assert [r.name for r in await select(d, sa.select(ev.c.name)
                                         .where(ev.c.user_id == "bystander"))] == ["login"]

    # Forgetting "' OR '1'='1" forgets that one user and nobody else.
    gone = await call(d, "DELETE", user_path(PAYLOADS[1]), BEARER)
    assert gone.json() == {"id": PAYLOADS[1], "deleted": True}
    left = sorted(r.id for r in await select(d, sa.select(u.c.id)))
    assert left == sorted(set(ids) - {PAYLOADS[1]})
    assert await select(d, sa.select(ev.c.id).where(ev.c.user_id == PAYLOADS[1])) == []
    assert len(await select(d, sa.select(ev.c.id))) == 1 + 3 * len(PAYLOADS) - 1
    missing = await call(d, "GET", user_path("' OR 1=1 --"), BEARER)
    assert missing.status == 404
    assert await table_names(d) == tables


async def test_ids_differing_only_by_trailing_spaces_are_different_users(
        daemon: Daemon) -> None:
    # MariaDB's utf8mb4_bin would pad ("ann " = "ann"): the store uses utf8mb4_nopad_bin.
    assert (await call(daemon, "PUT", user_path("ann"), BEARER,
                       {"attributes": {"who": "ann"}})).status == 200
    spaced = await call(daemon, "PUT", user_path("ann "), BEARER,
                        {"attributes": {"who": "spaced"}})
    assert spaced.status == 200, spaced.body
    gone = await call(daemon, "DELETE", user_path("ann "), BEARER)
    assert gone.json() == {"id": "ann ", "deleted": True}
    ann = await call(daemon, "GET", user_path("ann"), BEARER)
    assert ann.status == 200
    assert ann.json()["attributes"] == {"who": "ann"}


# -- data-source placeholders ------------------------------------------------------------

ROWS = [("c1", "c1@example.com", "pro", 1), ("c2", "c2@example.com", "free", 2),
        ("x' OR '1'='1", "m@example.com", "free", 3)]
SOURCE_PAYLOADS = [*PAYLOADS, "c1' OR '1'='1", "c1'; DROP TABLE customers; --", "c1' --",
                   "c1\\' OR 1=1 -- ", "' UNION SELECT id, email FROM customers --"]


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("mariadb", marks=pytest.mark.mariadb)])
def customer_url(request: pytest.FixtureRequest) -> str:
    """A customer database with one small table, on each dialect a source may use."""
    url = str(request.getfixturevalue(f"{request.param}_url"))
    sync = sa.engine.make_url(url).set(
        drivername="postgresql+psycopg2" if request.param == "postgres" else "mysql+pymysql")
    engine = sa.create_engine(sync, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id varchar(100) PRIMARY KEY, "
                             "email varchar(200), plan varchar(20), n integer)")
        conn.execute(sa.text("INSERT INTO customers VALUES (:i, :e, :p, :n)"),
                     [{"i": i, "e": e, "p": p, "n": n} for i, e, p, n in ROWS])
    engine.dispose()
    return url.replace("+asyncpg", "").replace("+aiomysql", "")


async def test_placeholder_payloads_only_ever_match_as_values(customer_url: str) -> None:
    src = source_for("crm", customer_url)
    try:
        for p in SOURCE_PAYLOADS:
            expected = [{"id": i, "email": e} for i, e, _p, _n in ROWS if i == p]
            for sql in ("SELECT id, email FROM customers WHERE id = '<%= v %>' ORDER BY id",
                        "SELECT id, email FROM customers WHERE id = <%= v %> ORDER BY id"):
                assert await src.fetch(sql, {"v": p}, what="audience") == expected, (p, sql)
            like = await src.fetch("SELECT id FROM customers WHERE email = '<%= v %>' OR "
                                   "plan = '<%= v %>'", {"v": p}, what="preload")
            assert like == []
            try:  # an integer column: PostgreSQL refuses the text, MySQL converts it to
                numeric = await src.fetch(  # a number (its leading digits): one value
                    "SELECT id FROM customers WHERE n = <%= v %>", {"v": p}, what="condition")
            except SourceError:
                numeric = []
            assert len(numeric) <= 1, (p, numeric)
        count = await src.fetch("SELECT COUNT(*) AS n FROM customers", {}, what="count")
        assert int(count[0]["n"]) == len(ROWS)  # type: ignore[call-overload]
        assert await src.fetch("SELECT id FROM customers WHERE id = '<%= v %>'",
                               {"v": "c1"}, what="control") == [{"id": "c1"}]
    finally:
        await src.close()
