"""Tracking and unsubscribe routes: open pixel, click redirect, unsubscribe page.

``GET /t/o/{token}`` records an open and answers a 1x1 GIF; ``GET /t/c/{token}``
records a click and redirects to the URL signed into the token, so only a URL that was
in that message can ever be a target (no open redirect); ``GET /u/{token}`` shows a
confirmation page (a link scanner's GET changes nothing) and ``POST /u/{token}``
unsubscribes, which is also RFC 8058's one-click (``List-Unsubscribe=One-Click``).
Opens and clicks are stored in ``engagement`` and published as ``message.opened`` /
``message.clicked``.
"""

from __future__ import annotations

import base64
import html
import re
from urllib.parse import quote

import sqlalchemy as sa
import structlog

from ..errors import TokenError
from ..http import HTTPError, Request, Response, Router
from ..kernel import Kernel
from ..schema import engagement, messages, subscriptions, suppressions
from ..userlocks import existing_users
from .tokens import Signer, TokenValue

__all__ = ["MARKETING_TOPIC", "PIXEL", "Tracking"]

log = structlog.get_logger("segflowd.tracking")

MARKETING_TOPIC = "marketing"
PIXEL = base64.b64decode(b"R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_NO_STORE = {"Cache-Control": "no-store, max-age=0"}
_WEB_URL = re.compile(r"^https?://[^\s]+$", re.IGNORECASE)
_URL_SAFE = "".join(map(chr, range(0x21, 0x7F)))  # printable ASCII is left as it is

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport"
content="width=device-width, initial-scale=1"><meta name="robots" content="noindex">
<title>{title}</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:4em auto;padding:0 1em">
<h1 style="font-size:1.4em">{title}</h1><p>{text}</p>{form}</body></html>"""


class Tracking:
    """The routes, built with the kernel and the token signer delivery signs links with."""

    def __init__(self, k: Kernel, signer: Signer) -> None:
        self.k = k
        self.signer = signer

    def register_routes(self, router: Router) -> None:
        router.add("GET", "/t/o/{token}", self.open)
        router.add("GET", "/t/c/{token}", self.click)
        router.add("GET", "/u/{token}", self.unsubscribe_page)
        router.add("POST", "/u/{token}", self.unsubscribe)

    def _verify(self, purpose: str, token: str) -> dict[str, TokenValue]:
        try:
            return self.signer.verify(purpose, token)
        except TokenError as exc:
            log.info("token.refused", purpose=purpose, reason=str(exc))
            raise HTTPError(404, "not_found", "this link is not valid") from None

    async def _record(self, kind: str, message_id: int, url: str | None) -> None:
        now = self.k.clock.now()
        async with self.k.store.begin() as conn:
            row = (await conn.execute(sa.select(messages.c.user_id, messages.c.template,
                                                messages.c.campaign)
                                      .where(messages.c.id == message_id))).first()
            if row is None:
                raise HTTPError(404, "not_found", "this link is not valid")
            await conn.execute(sa.insert(engagement).values(
                message_id=message_id, user_id=row.user_id, kind=kind, url=url,
                created_at=now))
        event = "message.opened" if kind == "open" else "message.clicked"
        data: dict[str, object] = {"message": message_id, "user_id": row.user_id,
                                   "template": row.template, "campaign": row.campaign}
        if url is not None:
            data["url"] = url
        self.k.metrics.inc("segflow_engagement_total", kind=kind)
        self.k.bus.publish(event, **data)

    async def open(self, request: Request) -> Response:
        claims = self._verify("o", request.params["token"])
        await self._record("open", int(claims["m"]), None)
        return Response(200, PIXEL, "image/gif", dict(_NO_STORE))

    async def click(self, request: Request) -> Response:
        claims = self._verify("c", request.params["token"])
        url = str(claims.get("l", ""))
        if not _WEB_URL.match(url):  # signed by us, but never redirect off the web
            raise HTTPError(404, "not_found", "this link is not valid")
        await self._record("click", int(claims["m"]), url)
        # A header is ASCII: a link with other characters (an IRI) goes out percent-encoded.
        location = quote(url, safe=_URL_SAFE)
        return Response(302, b"", "text/plain", {"Location": location, **_NO_STORE})

    async def unsubscribe_page(self, request: Request) -> Response:
        self._verify("u", request.params["token"])
        form = ('<form method="post"><button type="submit" style="font-size:1em;'
                'padding:.5em 1.2em">Unsubscribe</button></form>')
        body = _PAGE.format(title="Unsubscribe",
                            text="Stop receiving marketing email from us? Messages you "
                                 "ask for (receipts, password resets) still arrive.",
                            form=form)
        return Response(200, body.encode(), "text/html; charset=utf-8", dict(_NO_STORE))

    async def unsubscribe(self, request: Request) -> Response:
        claims = self._verify("u", request.params["token"])
        await self.apply_unsubscribe(claims)
        body = _PAGE.format(title="You are unsubscribed",
                            text=html.escape("You will get no more marketing email from us."),
                            form="")
        return Response(200, body.encode(), "text/html; charset=utf-8", dict(_NO_STORE))

    async def apply_unsubscribe(self, claims: dict[str, TokenValue]) -> None:
        """Unsubscribe the token's user from marketing (or suppress its bare address)."""
        now = self.k.clock.now()
        user_id = claims.get("u")
        message_id = claims.get("m")
        async with self.k.store.begin() as conn:
            if user_id is not None:
                done = await conn.execute(sa.update(subscriptions).where(
                    subscriptions.c.user_id == str(user_id),
                    subscriptions.c.topic == MARKETING_TOPIC,
                ).values(unsubscribed_at=now, updated_at=now))
                exists = bool(await existing_users(conn, [str(user_id)]))
                # A forgotten user's old link changes nothing: a row here would name them
                # again, and unsubscribe whoever signs up under the id next.
                if done.rowcount == 0 and exists:
                    await conn.execute(self.k.store.insert_ignore(subscriptions).values(
                        user_id=str(user_id), topic=MARKETING_TOPIC, unsubscribed_at=now,
                        updated_at=now))
            elif "a" in claims:
                await conn.execute(self.k.store.insert_ignore(suppressions).values(
                    address=str(claims["a"]).lower(), reason="unsubscribed", source="link",
                    detail=f"message {message_id}", created_at=now))
        log.info("user.unsubscribed", user_id=user_id, message=message_id)
        self.k.metrics.inc("segflow_unsubscribes_total")
        self.k.bus.publish("user.unsubscribed", user_id=user_id, topic=MARKETING_TOPIC,
                           message=message_id)
