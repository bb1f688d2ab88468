"""What the SMS provider tells the daemon: delivery reports and the recipients' replies.

Two routes per SMS provider whose plugin is ``twilio`` (``[sms] provider`` names it):

* ``POST /webhooks/{provider}/status``: Twilio's status callback (the daemon gives its
  URL with every message when ``[http] public_url`` is set). ``delivered`` is recorded
  on the message (``response.delivery``); ``undelivered`` and ``failed`` make a ``sent``
  message ``failed`` with Twilio's error code.
* ``POST /webhooks/{provider}/inbound``: a reply. ``STOP``, ``STOPALL``, ``UNSUBSCRIBE``,
  ``CANCEL``, ``END`` and ``QUIT`` turn the SMS subscription of every user with that
  ``phone`` off (marketing SMS is never sent to them again; transactional SMS still is),
  ``START``, ``YES`` and ``UNSTOP`` turn it on again, and ``HELP``/``INFO`` is answered
  with ``[sms] help_text`` (TwiML).

Both check ``X-Twilio-Signature`` (HMAC-SHA1 of the URL Twilio called and the sorted
form fields, keyed by the account's auth token) against ``[http] public_url`` plus the
path: 403 when it does not verify, so nobody but Twilio can unsubscribe a number or
fail a message. The reply's users are found by the ``phone`` attribute, which ingest
keeps in E.164, the form Twilio sends.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl

import sqlalchemy as sa
import structlog

from ..http import HTTPError, Request, Response, Router, json_response
from ..kernel import Kernel
from ..schema import messages, subscriptions, suppressions, users
from ..twiliosig import MESSAGE_SID, signature_valid
from .sms import SMS_TOPIC

__all__ = ["HELP_WORDS", "START_WORDS", "STOP_WORDS", "SmsHooks"]

log = structlog.get_logger("segflowd.delivery")

STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})
FORM_LIMIT = 64 * 1024  # bytes of a callback's form
FAILED = frozenset({"failed", "undelivered"})
_TWIML = "text/xml; charset=utf-8"


class SmsHooks:
    """The routes of the module docstring, for the ``[sms] provider`` table."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.name = k.config.sms.provider
        table = k.config.providers.get(self.name) if self.name else None
        self.options: Mapping[str, object] = table.options if table else {}

    def register_routes(self, router: Router) -> None:
        if self.name and str(self.options.get("plugin", self.name)) == "twilio":
            router.add("POST", f"/webhooks/{self.name}/status", self.status)
            router.add("POST", f"/webhooks/{self.name}/inbound", self.inbound)

    async def _form(self, request: Request) -> dict[str, str]:
        raw = await request.body(FORM_LIMIT)
        try:
            form = dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                                  strict_parsing=False))
        except UnicodeDecodeError:
            raise HTTPError(400, "invalid_payload", "the form is not UTF-8") from None
        query = request.scope.get("query_string", b"").decode("latin-1")
        tail = request.path + (f"?{query}" if query else "")
        public = self.k.config.http.public_url.rstrip("/")
        host = request.headers.get("host", "")
        # Twilio signs the URL it called: [http] public_url's, or (none set) the Host
        # it reached, over https behind a proxy or http directly.
        urls = [public + tail] if public else [f"https://{host}{tail}", f"http://{host}{tail}"]
        token = str(self.options.get("auth_token", ""))
        given = request.headers.get("x-twilio-signature", "")
        if not (token and given and any(signature_valid(token, u, form, given) for u in urls)):
            log.warning("sms.signature_refused", provider=self.name, path=request.path)
            raise HTTPError(403, "forbidden", "X-Twilio-Signature does not verify")
        return form

    async def status(self, request: Request) -> Response:
        form = await self._form(request)
        sid, state = form.get("MessageSid", ""), form.get("MessageStatus", "").lower()
        if not sid:
            raise HTTPError(400, "invalid_payload", "MessageSid is missing")
        mid = request.query.get("m", [""])[0]
        now = self.k.clock.now()
        m = messages.c
        # The row named in the callback's URL (signed with it), which a report may reach
        # before delivery recorded Twilio's answer (its sid); else the row of that sid.
        ours = [m.channel == "sms", m.provider == self.name]
        ours += ([m.id == int(mid), sa.or_(m.provider_message_id == sid,
                                           m.provider_message_id.is_(None))]
                 if mid.isdigit() else [m.provider_message_id == sid])
        async with self.k.store.begin() as conn:
            row = (await conn.execute(sa.select(m.id, m.status, m.response,
                                                m.provider_message_id).where(*ours)
                                      .with_for_update())).first()
            if row is None:
                return json_response({"ok": True, "matched": False})
            before = row.response if isinstance(row.response, dict) else {}
            if not _later(state, str(before.get("delivery", ""))):
                return json_response({"ok": True, "matched": True, "stale": True})
            report: dict[str, object] = {"delivery": state,
                                         "at": now.isoformat(timespec="seconds") + "Z"}
            if form.get("ErrorCode"):
                report["error_code"] = form["ErrorCode"]
            values: dict[str, object] = {"response": report, "updated_at": now}
            if row.provider_message_id is None and MESSAGE_SID.fullmatch(sid):
                # a message in doubt (its answer lost) learns its sid: a forget can then
                # delete Twilio's copy (delivery.remotecopies)
                values["provider_message_id"] = sid
            if state in FAILED and row.status in ("sent", "unknown"):
                values.update(status="failed", last_error=_failure(report))
            elif state in ("sent", "delivered") and row.status == "unknown":
                values["status"] = "sent"  # it did go out: no longer in doubt
            await conn.execute(sa.update(messages).where(m.id == row.id).values(**values))
        self.k.metrics.inc("segflow_sms_reports_total", status=state or "unknown")
        if state in FAILED or state == "delivered":
            self.k.bus.publish(f"sms.{'failed' if state in FAILED else 'delivered'}",
                               message=int(row.id), provider_message_id=sid, status=state)
        return json_response({"ok": True, "matched": True})

    async def inbound(self, request: Request) -> Response:
        form = await self._form(request)
        number = form.get("From", "").strip()
        word = form.get("Body", "").strip().upper()
        if word in HELP_WORDS:
            text = html.escape(self.k.config.sms.help_text)
            return Response(200, f'<?xml version="1.0" encoding="UTF-8"?><Response><Message>'
                                 f"{text}</Message></Response>".encode(), _TWIML)
        if number and (word in STOP_WORDS or word in START_WORDS):
            changed = await self._subscribe(number, stop=word in STOP_WORDS)
            log.info("sms.subscription", provider=self.name, stop=word in STOP_WORDS,
                     users=changed)
            self.k.bus.publish("sms.subscription", stop=word in STOP_WORDS, users=changed)
        return Response(200, b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>',
                        _TWIML)

    async def _subscribe(self, number: str, *, stop: bool) -> int:
        """Set the SMS subscription of every user whose phone is ``number``; how many.

        A START also lifts the suppression of the number that this provider's opt-out
        error made (Twilio answers 21610 after a STOP, and lifts its block on START)."""
        now: dt.datetime = self.k.clock.now()
        async with self.k.store.begin() as conn:
            if not stop:
                await conn.execute(sa.delete(suppressions).where(
                    suppressions.c.address == number, suppressions.c.source == self.name))
            ids = list((await conn.execute(sa.select(users.c.id).where(
                users.c.attributes["phone"].as_string() == number))).scalars())
            for uid in ids:
                done = await conn.execute(sa.update(subscriptions).where(
                    subscriptions.c.user_id == uid, subscriptions.c.topic == SMS_TOPIC
                ).values(unsubscribed_at=now if stop else None, updated_at=now))
                if done.rowcount == 0:
                    await conn.execute(self.k.store.insert_ignore(subscriptions).values(
                        user_id=uid, topic=SMS_TOPIC, unsubscribed_at=now if stop else None,
                        updated_at=now))
        return len(ids)


# Twilio's message states in the order they happen: a report never moves a message back
# (callbacks may arrive out of order), and a final one is never replaced.
_RANK = {"accepted": 0, "queued": 0, "scheduled": 0, "sending": 1, "sent": 2,
         "delivered": 3, "undelivered": 3, "failed": 3, "canceled": 3}
_FINAL_RANK = 3


def _later(state: str, before: str) -> bool:
    """Whether a report of ``state`` may replace one of ``before`` ("" for none)."""
    if not before:
        return True
    new, old = _RANK.get(state, 0), _RANK.get(before, 0)
    return old < _FINAL_RANK and new >= old


def _failure(report: Mapping[str, object]) -> str:
    return f"{report['delivery']} (Twilio error {report.get('error_code') or 'unknown'})"


async def settle_reports(k: Kernel, ids: Sequence[int]) -> None:
    """Fail SMS rows just recorded ``sent`` whose failure report came while they were
    being sent (:meth:`SmsHooks.status` records it, but only a ``sent`` row turns
    ``failed`` there)."""
    m = messages.c
    async with k.store.begin() as conn:
        rows = (await conn.execute(sa.select(m.id, m.response).where(
            m.id.in_(list(ids)), m.status == "sent", m.channel == "sms",
            m.response.is_not(None)))).all()
        for r in rows:
            report = r.response if isinstance(r.response, dict) else {}
            if report.get("delivery") in FAILED:
                await conn.execute(sa.update(messages).where(
                    m.id == r.id, m.status == "sent").values(
                    status="failed", last_error=_failure(report)))
