"""Forged and tampered tracking and unsubscribe links are refused, on every token route.

The genuine links come out of a real delivery (the ``.eml`` the outbox provider wrote);
each is then altered every way a visitor could: a character changed anywhere, cut
short, extended, moved to another route, its claims rewritten under the old signature,
signed again with another key. The only alterations that may still work are those that
decode to the very same signed bytes (base64's spare bits); everything else is a 404,
and nothing is unsubscribed, suppressed or counted as an open or click.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from asgi_daemon import asgi_call, assert_sane, running, signer_of
from security_mail import OFFER, SIGNING_KEY, deliver, mail_app, put_user

from segflowd.daemon import Daemon
from segflowd.delivery.service import DeliveryService
from segflowd.delivery.tokens import Signer
from segflowd.schema import engagement, subscriptions, suppressions

pytestmark = pytest.mark.anyio

ROUTE_OF = {"o": "/t/o/", "c": "/t/c/", "u": "/u/"}  # link purpose -> route prefix
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def same_signed_bytes(token: str, original: str) -> bool:
    """``token`` carries exactly what ``original`` was signed over (payload and MAC)."""
    if token.count(".") != 1:
        return False
    payload, mac = token.split(".")
    good_payload, good_mac = original.split(".")
    try:
        return payload == good_payload and _unb64(mac) == _unb64(good_mac)
    except ValueError:
        return False


@pytest.fixture
async def mailed(sqlite_url: str, tmp_path: Path) -> AsyncIterator[tuple[Daemon, dict[str, str]]]:
    """The daemon, and the genuine tokens of one delivered campaign message to u1."""
    async with running(tmp_path / "d", sqlite_url, app=mail_app(tmp_path),
                       environ={"SEGFLOW_EMAIL_SECRET": SIGNING_KEY}) as d:
        await put_user(d, "u1", {"email": "ann@example.org", "name": "Ann"})
        await put_user(d, "victim", {"email": "victim@example.org", "name": "Vic"})
        sent = await deliver(d, "u1", plan="pro")
        assert sent.status == "sent", sent.last_error
        msg = sent.parsed()
        html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        tokens = {
            "u": re.search(r"<http://127\.0\.0\.1:8787/u/([^>]+)>",
                           msg["List-Unsubscribe"]).group(1),  # type: ignore[union-attr]
            "o": re.search(r"/t/o/([A-Za-z0-9_.-]+)", html).group(1),  # type: ignore[union-attr]
            "c": re.search(r"/t/c/([A-Za-z0-9_.-]+)", html).group(1),  # type: ignore[union-attr]
        }
        yield d, tokens


async def get(d: Daemon, method: str, path: str) -> int:
    reply = await asgi_call(d.router, method, path.encode("utf-8", "surrogatepass"))
    assert_sane(reply, path[:100])
    return reply.status


async def rows(d: Daemon, table: sa.Table) -> list[sa.Row[object]]:
    async with d.store.connect() as conn:
        return list(await conn.execute(sa.select(table)))


def tamperings(token: str) -> list[str]:
    payload, mac = token.split(".")
    out = []
    for i, ch in enumerate(token):  # one character changed, anywhere
        if ch != ".":
            out.append(token[:i] + ("A" if ch != "A" else "B") + token[i + 1:])
            out.append(token[:i] + ("_" if ch != "_" else "-") + token[i + 1:])
    claims = json.loads(_unb64(payload))
    for change in ({"u": "victim"}, {"m": int(claims["m"]) + 1}, {"l": "https://evil.example/"},
                   {"a": "victim@example.org"}):
        forged = base64.urlsafe_b64encode(json.dumps({**claims, **change}, separators=(",", ":"),
                                                     sort_keys=True).encode()).rstrip(b"=")
        out.append(forged.decode() + "." + mac)  # rewritten claims, the old signature
    out += [
        payload, payload + ".", "." + mac, mac + "." + payload, token + ".", token + ".x",
        token[:-1], token[:-4], token + "A", token + "AAAA", payload + "." + mac[:10],
        token.replace(".", ".."), token * 2, token + "." + mac, "", ".", "x" * 5000,
        Signer("wrong-key").sign("u", claims), Signer(SIGNING_KEY + " ").sign("u", claims),
        Signer("wrong-key").sign("u", {"u": "victim", "m": int(claims["m"])}),
    ]
    return out


async def test_genuine_links_work_once_delivered(mailed: tuple[Daemon, dict[str, str]]) -> None:
    """The control: the links as delivered do what they are for."""
    d, tokens = mailed
    assert await get(d, "GET", f"/t/o/{tokens['o']}") == 200
    click = await asgi_call(d.router, "GET", f"/t/c/{tokens['c']}".encode())
    assert click.status == 302
    assert click.headers["location"] == OFFER
    assert await get(d, "GET", f"/u/{tokens['u']}") == 200
    [delivery] = [s for s in d.services if isinstance(s, DeliveryService)]
    await delivery.engagement.flush()  # opens and clicks are written in the background
    assert [r.kind for r in await rows(d, engagement)] == ["open", "click"]
    assert await rows(d, subscriptions) == []  # the page alone changes nothing
    assert await get(d, "POST", f"/u/{tokens['u']}") == 200
    assert [(r.user_id, r.topic) for r in await rows(d, subscriptions)] == [("u1", "marketing")]


async def test_every_tampered_or_forged_token_is_refused_on_every_token_route(
        mailed: tuple[Daemon, dict[str, str]]) -> None:
    d, tokens = mailed
    token_routes = [(m, t.removesuffix("{token}")) for m, t in d.router.routes()
                    if t.endswith("/{token}") and not t.startswith("/api/")]  # a device's
    assert sorted(token_routes) == [("GET", "/t/c/"), ("GET", "/t/o/"), ("GET", "/u/"),
                                    ("POST", "/u/")]
    tried = refused = 0
    accepted: list[tuple[str, str]] = []  # (method, prefix) of same-bytes respellings
    for purpose, token in tokens.items():
        for method, prefix in token_routes:
            candidates = tamperings(token)
            if prefix != ROUTE_OF[purpose]:
                candidates.append(token)  # a genuine token on another route
            for candidate in candidates:
                status = await get(d, method, prefix + candidate)
                tried += 1
                if prefix == ROUTE_OF[purpose] and same_signed_bytes(candidate, token):
                    accepted.append((method, prefix))  # the same signed bytes, spelt
                    continue  # differently: not a forgery
                assert status == 404, (purpose, method, prefix, candidate[:120], status)
                refused += 1
    assert refused > 0.9 * tried  # nearly every alteration changes the signed bytes
    # Only respellings of genuine links had any effect, and only for u1's message.
    unsubscribed = [(r.user_id, r.topic) for r in await rows(d, subscriptions)]
    assert unsubscribed == ([("u1", "marketing")] if ("POST", "/u/") in accepted else [])
    assert await rows(d, suppressions) == []
    counted = await rows(d, engagement)
    assert len(counted) == sum(1 for _m, p in accepted if p.startswith("/t/"))
    assert {(r.message_id, r.user_id) for r in counted} <= {(1, "u1")}


def respellings(token: str) -> list[str]:
    """Other spellings of ``token`` that lenient base64 decoding reads as the same signed
    bytes: padding, junk it skips, the last character's spare bits set another way."""
    payload, mac = token.split(".")
    out = [token + "=", token + "==", f"{payload}=.{mac}", token + "!!", token + "~~~~",
           token + "=A"]
    for index, part in ((1, mac), (0, payload)):
        spare = {2: 0b1111, 3: 0b11}.get(len(part) % 4, 0)
        for bits in range(1, spare + 1):
            pieces = [payload, mac]
            pieces[index] = part[:-1] + B64[B64.index(part[-1]) ^ bits]
            out.append(".".join(pieces))
    return out


async def test_a_token_has_one_spelling_on_its_own_route(
        mailed: tuple[Daemon, dict[str, str]]) -> None:
    """A genuine link respelt (same signed bytes) is refused too: no padding, no junk, no
    spare bits, so a link cannot be varied to count an open twice or slip past a filter."""
    d, tokens = mailed
    for purpose, token in tokens.items():
        candidates = respellings(token)
        assert len(candidates) > 8
        for candidate in candidates:
            for method in ("GET", "POST") if purpose == "u" else ("GET",):
                status = await get(d, method, ROUTE_OF[purpose] + candidate)
                assert status == 404, (purpose, method, candidate, status)
    [delivery] = [s for s in d.services if isinstance(s, DeliveryService)]
    await delivery.engagement.flush()
    assert await rows(d, engagement) == []
    assert await rows(d, subscriptions) == []


async def test_links_sent_before_a_secret_rotation_still_work(
        sqlite_url: str, tmp_path: Path) -> None:
    """``[email] secret_previous`` keeps the links of mail already sent working after
    ``secret`` changes; new links are signed with the new secret alone."""
    app = mail_app(tmp_path)
    async with running(tmp_path / "d", sqlite_url, app=app,
                       environ={"SEGFLOW_EMAIL_SECRET": SIGNING_KEY}) as d:
        await put_user(d, "u1", {"email": "ann@example.org", "name": "Ann"})
        sent = await deliver(d, "u1", plan="pro")
        assert sent.status == "sent", sent.last_error
        header = sent.parsed()["List-Unsubscribe"]
        token = re.search(r"/u/([A-Za-z0-9_.-]+)>", header).group(1)  # type: ignore[union-attr]
    new = "security-signing-key-2"
    async with running(tmp_path / "d", sqlite_url, app=app,
                       environ={"SEGFLOW_EMAIL_SECRET": new}) as d:
        assert await get(d, "POST", f"/u/{token}") == 404  # the control: rotated alone
    async with running(tmp_path / "d", sqlite_url, app=app, environ={
            "SEGFLOW_EMAIL_SECRET": new, "SEGFLOW_EMAIL_SECRET_PREVIOUS": SIGNING_KEY}) as d:
        assert await get(d, "GET", f"/u/{token}") == 200
        assert await get(d, "POST", f"/u/{token}") == 200
        assert [(r.user_id, r.topic) for r in await rows(d, subscriptions)] == [
            ("u1", "marketing")]
        fresh = signer_of(d).sign("u", {"u": "u1", "m": 1})
        assert Signer(new).verify("u", fresh) == {"u": "u1", "m": 1}
