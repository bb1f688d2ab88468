"""Tracking and unsubscribe routes: open pixel, click redirect, unsubscribe page.

``GET /t/o/{token}`` counts an open and answers a 1x1 GIF; ``GET /t/c/{token}`` counts a
click and redirects to the URL signed into the token, so only a URL that was in that
message can ever be a target (no open redirect); ``GET /u/{token}`` shows the preference
page (:mod:`segflowd.delivery.preferences`; a link scanner's GET changes nothing), whose
form ``POST``s its choices; any other ``POST /u/{token}`` is RFC 8058's one-click
(``List-Unsubscribe=One-Click``) and turns off the message's topic (marketing without one).

A ``HEAD`` on the pixel or a link answers as ``GET`` does and counts nothing: a link
checker is not a reader. A hit goes to an :class:`EngagementRecorder`, so the answer never
waits for the store (a store outage still redirects every link); the recorder writes
in the background and keeps, in ``engagement``, one row per message, kind, URL and
``machine`` flag with its first and last hit and a count. ``machine`` marks a hit whose
user agent is a known prefetcher or link scanner (:func:`is_machine`: Apple Mail Privacy
Protection's bare ``Mozilla/5.0``, crawlers, mail-security scanners); ``rt.opened()`` and
``rt.clicked()`` count only hits that are not. Each written hit is published as
``message.opened`` / ``message.clicked`` (with ``machine: true`` for a machine's).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime as dt
import html
import re
from collections.abc import Sequence
from urllib.parse import quote

import anyio
import sqlalchemy as sa
import structlog
from anyio.abc import TaskStatus
from sqlalchemy.ext.asyncio import AsyncConnection

from ..appcraft import MARKETING_TOPIC
from ..errors import TokenError
from ..http import HTTPError, Request, Response, Router
from ..kernel import Kernel
from ..schema import engagement, messages, suppressions
from .msgevents import record_message_event
from .preferences import (
    FORM_LIMIT,
    link_alive,
    message_topic,
    parse_form,
    publish_changes,
    read_preferences,
    render_page,
    set_preferences,
)
from .tokens import Signer, TokenValue

__all__ = ["MARKETING_TOPIC", "PIXEL", "EngagementRecorder", "EngagementStatistics", "Hit",
           "Tracking", "is_machine"]

log = structlog.get_logger("segflowd.tracking")

PIXEL = base64.b64decode(b"R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
BUFFER_SIZE = 10_000  # hits waiting for the store; past it new hits are dropped (counted)
FLUSH_INTERVAL = 1.0  # seconds between the recorder's writes
FLUSH_BATCH = 500  # hits per write transaction
_NO_STORE = {"Cache-Control": "no-store, max-age=0"}
_WEB_URL = re.compile(r"^https?://[^\s]+$", re.IGNORECASE)
_URL_SAFE = "".join(map(chr, range(0x21, 0x7F)))  # printable ASCII is left as it is
# Apple Mail Privacy Protection fetches every image of a message on delivery through
# Apple's proxy with this bare user agent (Mail, opening it, sends a full one).
_PREFETCH_AGENTS = frozenset({"mozilla/5.0"})
# Crawlers, link expanders, HTTP libraries of scripts and mail-security link scanners.
# Image proxies that fetch when a person opens (GoogleImageProxy, YahooMailProxy) are
# not among them.
_MACHINE_AGENT = re.compile(
    r"[a-z]bot\b|\bbot\b|crawler|spider|headlesschrome|phantomjs|python-requests|"
    r"python-urllib|\bcurl/|\bwget/|go-http-client|libwww|okhttp|\bjava/|facebookexternalhit|"
    r"skypeuripreview|barracuda|mimecast|proofpoint|symantec|zscaler|trendmicro|forcepoint",
    re.IGNORECASE)

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport"
content="width=device-width, initial-scale=1"><meta name="robots" content="noindex">
<title>{title}</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:4em auto;padding:0 1em">
<h1 style="font-size:1.4em">{title}</h1><p>{text}</p>{form}</body></html>"""


def is_machine(user_agent: str) -> bool:
    """Whether a hit with this ``User-Agent`` is a prefetch or scanner, not a reader.

    Best effort: a known agent is recognised; an unknown or missing one counts as a person.
    """
    agent = user_agent.strip()
    return agent.lower() in _PREFETCH_AGENTS or bool(_MACHINE_AGENT.search(agent))


@dataclasses.dataclass(frozen=True)
class Hit:
    """One open (``kind`` "open", no ``url``) or click, as the route saw it."""

    kind: str
    message_id: int
    url: str | None
    machine: bool
    at: dt.datetime


@dataclasses.dataclass(frozen=True)
class EngagementStatistics:
    buffered: int  # hits waiting to be written
    recorded: int  # hits written since start
    dropped: int  # hits lost: the buffer was full, or the stop could not write them
    write_errors: int  # writes that failed (the hits stayed buffered)


class EngagementRecorder:
    """Opens and clicks on their way to the store, so no tracking answer waits for it.

    :meth:`add` buffers a hit (at most ``capacity``: past it the hit is dropped, counted
    in ``segflow_engagement_dropped_total`` and logged once per run of drops, and the
    route answers all the same). While :meth:`run` runs, the buffer is written every
    ``interval`` seconds and once more when :meth:`stop` is called; a write that fails
    keeps its hits for the next. Without :meth:`run` (a simulation steps delivery
    itself) :meth:`record` writes at once.
    """

    def __init__(self, k: Kernel, *, capacity: int = BUFFER_SIZE,
                 interval: float = FLUSH_INTERVAL) -> None:
        self.k = k
        self.capacity = capacity
        self.interval = interval
        self._hits: collections.deque[Hit] = collections.deque()
        self._lock = anyio.Lock()  # one write at a time, in order
        self._running = False
        self._stop = anyio.Event()
        self._dropping = self._failing = False
        self._recorded = self._dropped = self._errors = 0
        k.metrics.describe("segflow_engagement_dropped_total", "counter",
                           "opens and clicks not recorded: the recorder's buffer was full")

    async def record(self, hit: Hit) -> None:
        """Buffer ``hit``; without a running recorder, write it now (errors raise)."""
        if self.add(hit) and not self._running:
            await self.flush()

    def add(self, hit: Hit) -> bool:
        """Buffer ``hit``; False when the buffer is full and it was dropped."""
        if len(self._hits) >= self.capacity:
            self._drop(1, "buffer_full")
            return False
        self._hits.append(hit)
        return True

    def _drop(self, n: int, reason: str) -> None:
        self._dropped += n
        self.k.metrics.inc("segflow_engagement_dropped_total", float(n))
        if not self._dropping or reason != "buffer_full":
            log.warning("engagement.dropped", reason=reason, hits=n, dropped_total=self._dropped,
                        buffered=len(self._hits))
        self._dropping = reason == "buffer_full"

    async def flush(self) -> int:
        """Write every buffered hit; return how many. A store error raises, the hits kept."""
        written = 0
        async with self._lock:
            while self._hits:
                batch = [self._hits[i] for i in range(min(FLUSH_BATCH, len(self._hits)))]
                try:
                    await self._write(batch)
                except Exception:
                    self._errors += 1
                    raise
                for _ in batch:  # add() only appends: the batch is still at the front
                    self._hits.popleft()
                written += len(batch)
                self._recorded += len(batch)
                self._dropping = False
        return written

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write the buffer every ``interval`` seconds until :meth:`stop`, then once more."""
        self._running = True
        task_status.started()
        try:
            while not self._stop.is_set():
                async with anyio.create_task_group() as tg:
                    async def tick() -> None:
                        await self.k.clock.sleep(self.interval)
                        tg.cancel_scope.cancel()

                    tg.start_soon(tick)
                    await self._stop.wait()
                    tg.cancel_scope.cancel()
                await self._flush_logged()
        finally:
            self._running = False
            if self._hits:  # cancelled, or the last write failed: say what is lost
                self._drop(len(self._hits), "stopped")
                self._hits.clear()

    def stop(self) -> None:
        """Ask :meth:`run` to write what is buffered and return."""
        self._stop.set()

    async def _flush_logged(self) -> None:
        try:
            written = await self.flush()
        except Exception as exc:  # the store is away: the hits wait for the next write
            if not self._failing:  # once per outage, not once a second
                log.warning("engagement.write_failed", buffered=len(self._hits),
                            error=f"{type(exc).__name__}: {exc}")
            self._failing = True
            return
        if self._failing:
            log.info("engagement.write_recovered", written=written)
        self._failing = False

    def statistics(self) -> EngagementStatistics:
        return EngagementStatistics(buffered=len(self._hits), recorded=self._recorded,
                                    dropped=self._dropped, write_errors=self._errors)

    async def _write(self, batch: Sequence[Hit]) -> None:
        m = messages.c
        ids = sorted({h.message_id for h in batch})
        # (message, kind, url, machine): its hits in this batch
        groups: dict[tuple[int, str, str | None, bool], list[Hit]] = {}
        async with self.k.store.begin() as conn:
            # Locked (MariaDB) until the hits are written: a forget or a prune of these
            # messages waits for them and then clears them, instead of missing them.
            found = {int(r.id): r for r in await conn.execute(sa.select(
                m.id, m.user_id, m.to_address, m.template, m.campaign).where(m.id.in_(ids))
                .order_by(m.id).with_for_update())}
            for h in batch:
                row = found.get(h.message_id)
                if row is None:  # pruned since it was sent: nothing to count it on
                    continue
                # A forgotten user's message: its link may name them, keep it out.
                url = h.url if row.user_id is not None or row.to_address is not None else None
                groups.setdefault((h.message_id, h.kind, url, h.machine), []).append(h)
            for (mid, kind, url, machine), hits in groups.items():
                await _upsert(conn, mid, found[mid].user_id, kind, url, machine, hits)
        for (mid, kind, url, machine), hits in groups.items():
            row = found[mid]
            data: dict[str, object] = {"message": mid, "user_id": row.user_id,
                                       "template": row.template, "campaign": row.campaign}
            if url is not None:
                data["url"] = url
            if machine:
                data["machine"] = True
            event = "message.opened" if kind == "open" else "message.clicked"
            for _ in hits:
                self.k.bus.publish(event, **data)
            self.k.metrics.inc("segflow_engagement_total", float(len(hits)), kind=kind)


async def _upsert(conn: AsyncConnection, message_id: int, user_id: str | None, kind: str,
                  url: str | None, machine: bool, hits: Sequence[Hit]) -> None:
    """Add ``hits`` to the row of (message, kind, url, machine), or make it."""
    e = engagement.c
    first, last = min(h.at for h in hits), max(h.at for h in hits)
    same = (e.message_id == message_id, e.kind == kind,
            e.url.is_(None) if url is None else e.url == url, e.machine == machine)
    # One recorder per store (the daemon holds the store's lock): no other writer races
    # this read.
    row = (await conn.execute(sa.select(e.id).where(*same).order_by(e.id).limit(1))).first()
    if row is None:
        await conn.execute(sa.insert(engagement).values(
            message_id=message_id, user_id=user_id, kind=kind, url=url, machine=machine,
            hits=len(hits), created_at=first, last_at=last))
    else:
        await conn.execute(sa.update(engagement).where(e.id == row.id).values(
            hits=e.hits + len(hits), last_at=sa.case((e.last_at > last, e.last_at), else_=last)))


class Tracking:
    """The routes, built with the kernel, the token signer delivery signs links with and
    the recorder of opens and clicks (a recorder of its own, writing at once, without)."""

    def __init__(self, k: Kernel, signer: Signer,
                 recorder: EngagementRecorder | None = None) -> None:
        self.k = k
        self.signer = signer
        self.recorder = recorder or EngagementRecorder(k)

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

    async def _count(self, request: Request, kind: str, message_id: int,
                     url: str | None) -> None:
        if request.method == "HEAD":  # a link checker: answered, not counted
            return
        machine = is_machine(request.headers.get("user-agent", ""))
        await self.recorder.record(Hit(kind, message_id, url, machine, self.k.clock.now()))

    async def open(self, request: Request) -> Response:
        claims = self._verify("o", request.params["token"])
        await self._count(request, "open", int(claims["m"]), None)
        return Response(200, PIXEL, "image/gif", dict(_NO_STORE))

    async def click(self, request: Request) -> Response:
        claims = self._verify("c", request.params["token"])
        url = str(claims.get("l", ""))
        if not _WEB_URL.match(url):  # signed by us, but never redirect off the web
            raise HTTPError(404, "not_found", "this link is not valid")
        await self._count(request, "click", int(claims["m"]), url)
        # A header is ASCII: a link with other characters (an IRI) goes out percent-encoded.
        location = quote(url, safe=_URL_SAFE)
        return Response(302, b"", "text/plain", {"Location": location, **_NO_STORE})

    async def unsubscribe_page(self, request: Request) -> Response:
        """The preference page (a GET changes nothing: link scanners fetch it)."""
        claims = self._verify("u", request.params["token"])
        return await self._preferences(claims)

    async def _preferences(self, claims: dict[str, TokenValue], notice: str = "") -> Response:
        topics = self.k.app.topics
        prefs = None
        async with self.k.store.connect() as conn:
            own = await message_topic(conn, claims.get("m"))
            if claims.get("u") is not None:
                if not await link_alive(conn, str(claims["u"]), claims.get("m")):
                    return _dead_link()
                prefs = await read_preferences(conn, str(claims["u"]), topics)
        body = render_page(topics, prefs, own_topic=own, notice=notice)
        return Response(200, body, "text/html; charset=utf-8", dict(_NO_STORE))

    async def unsubscribe(self, request: Request) -> Response:
        """The preference form's save, or (any other POST) RFC 8058's one-click."""
        claims = self._verify("u", request.params["token"])
        choices = parse_form(await request.body(FORM_LIMIT), self.k.app.topics)
        if choices is not None and claims.get("u") is not None:
            changed = await self.save_preferences(str(claims["u"]), choices, claims.get("m"))
            if changed is None:  # forgotten since the page was shown: nothing was written
                return _dead_link()
            async with self.k.store.connect() as conn:
                own = await message_topic(conn, claims.get("m"))
            if changed.get(own) is False or changed.get(MARKETING_TOPIC) is False:
                await record_message_event(self.k, claims.get("m"), "unsubscribed")
            return await self._preferences(claims, "Your preferences are saved.")
        topic = await self.apply_unsubscribe(claims)
        if topic is None:
            return _dead_link()
        what = self.k.app.topics.get(topic)
        text = f"“{what.title}” email" if what is not None else (
            "marketing email" if topic == MARKETING_TOPIC else f"“{topic}” email")
        body = _PAGE.format(title="You are unsubscribed",
                            text=html.escape(f"You will get no more {text} from us."),
                            form="")
        return Response(200, body.encode(), "text/html; charset=utf-8", dict(_NO_STORE))

    async def save_preferences(self, user_id: str, choices: dict[str, bool],
                               message_id: object = None) -> dict[str, bool] | None:
        """Apply a preference form's choices (each topic and marketing: True to stay); the
        changes, or None when the link no longer acts for the user (nothing written)."""
        async with self.k.store.begin() as conn:
            changed = None
            if await link_alive(conn, user_id, message_id):
                changed = await set_preferences(conn, self.k.store, user_id, choices,
                                                self.k.clock.now())
        publish_changes(self.k, user_id, changed or {})
        return changed

    async def apply_unsubscribe(self, claims: dict[str, TokenValue]) -> str | None:
        """Unsubscribe the token's user from its message's topic (marketing when it has
        none), or suppress its bare address; the topic (None: the link no longer acts for
        its user, nothing was written)."""
        now = self.k.clock.now()
        user_id = claims.get("u")
        message_id = claims.get("m")
        topic = MARKETING_TOPIC
        async with self.k.store.begin() as conn:
            if user_id is not None:
                topic = await message_topic(conn, message_id)
                # A forgotten user's old link changes nothing (set_preferences says why),
                # nor does it change whoever signs up under the id next (link_alive).
                if not await link_alive(conn, str(user_id), message_id):
                    return None
                await set_preferences(conn, self.k.store, str(user_id), {topic: False}, now)
            elif "a" in claims:
                await conn.execute(self.k.store.insert_ignore(suppressions).values(
                    address=str(claims["a"]).lower(), reason="unsubscribed", source="link",
                    detail=f"message {message_id}", created_at=now))
        await record_message_event(self.k, message_id, "unsubscribed")  # for reports
        log.info("user.unsubscribed", user_id=user_id, message=message_id, topic=topic)
        self.k.metrics.inc("segflow_unsubscribes_total")
        self.k.bus.publish("user.unsubscribed", user_id=user_id, topic=topic,
                           message=message_id)
        return topic


def _dead_link() -> Response:
    """The page of a link that no longer acts for its user (they were forgotten)."""
    body = _PAGE.format(title="This link is no longer valid",
                        text="It belonged to an account that no longer exists: nothing was "
                             "changed.", form="")
    return Response(200, body.encode(), "text/html; charset=utf-8", dict(_NO_STORE))
