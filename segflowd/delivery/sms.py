"""SMS in the outbox: rendering, the recipient's number, subscription and quiet hours.

An SMS row (``messages.channel = "sms"``) goes through the same lane machinery as mail
(:mod:`segflowd.delivery.service`): claimed, prepared here, marked ``sending`` right
before the provider gets it, its outcome recorded by :mod:`segflowd.delivery.outcomes`
(at most once, retries with backoff, ``unknown`` after a crash mid-send). What differs
is preparing it:

* the recipient is the row's ``to_address`` or the user's ``phone`` attribute, which
  ingest normalised to E.164; an invalid number fails the message with the reason,
  and no send is attempted;
* a number suppressed (the provider said the recipient opted out) is never sent to;
* marketing SMS (campaigns, broadcasts) is never sent to a user whose ``sms``
  subscription is off (an inbound STOP), nor to one unsubscribed from its message's
  topic (``app.topic``); transactional SMS is;
* marketing SMS due inside ``[sms] quiet_hours`` (the user's ``timezone`` attribute,
  else ``[daemon] default_timezone``) is held, queued again for the hours' end with its
  attempt given back: held, never dropped.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import sqlalchemy as sa

from ..app import Segflow
from ..appcraft import MARKETING_TOPIC, SMS_STOP_TOPIC
from ..configchannels import parse_quiet_hours
from ..errors import TemplateError
from ..kernel import Kernel
from ..localtime import ALL_DAYS, Window, count_fallback, default_zone, user_zone
from ..phones import check_phone
from ..providers import MARKETING_KINDS, OutgoingSms
from ..schema import subscriptions, suppressions, users
from .gates import apply_gates, build_gates
from .preferences import blocked_by
from .prepare import Prepared
from .templates import event_context

__all__ = ["SMS_TOPIC", "SmsPreparer", "SmsRenderer", "quiet_until"]

SMS_TOPIC = SMS_STOP_TOPIC  # the subscriptions topic an inbound STOP turns off


class SmsRenderer:
    """Renders the app's SMS templates (Jinja2 text, undefined names an error)."""

    def __init__(self, app: Segflow) -> None:
        self.app = app
        self.env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        self._compiled: dict[str, jinja2.Template] = {}

    def render(self, name: str, context: Mapping[str, object]) -> str:
        """The text of SMS template ``name``; TemplateError saying what went wrong."""
        tpl = self.app.sms_templates.get(name)
        if tpl is None:
            raise TemplateError(f"unknown SMS template {name!r}")
        where = f"SMS template {name!r}"
        event = context.get("event")
        if isinstance(event, dict):
            context = {**context, "event": event_context(event)}
        try:
            compiled = self._compiled.get(name)
            if compiled is None:
                compiled = self._compiled[name] = self.env.from_string(tpl.text)
            text = compiled.render(context)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{where}: line {exc.lineno}: {exc.message}") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"{where}: {exc.message}") from None
        except Exception as exc:
            raise TemplateError(f"{where}: {type(exc).__name__}: {exc}") from None
        text = text.strip()
        if not text:
            raise TemplateError(f"{where}: rendered an empty message")
        return text


def quiet_until(now: dt.datetime, zone: dt.tzinfo, hours: tuple[dt.time, dt.time]
                ) -> dt.datetime | None:
    """When the quiet hours around ``now`` (naive UTC) end, as naive UTC, in ``zone``'s
    local time; None when ``now`` is outside them. ``hours`` may wrap midnight
    (21:00-08:00). An end that falls in a DST gap is taken as the clock shows it after;
    one whose wall time comes twice (DST fall-back) is the next of the two."""
    return Window(hours[0], hours[1], ALL_DAYS, "quiet hours").closes(now, zone)


class SmsPreparer:
    """Turns claimed SMS rows into :class:`Prepared` ones (message, or decided status)."""

    def __init__(self, k: Kernel, *, public_url: str, lane: str) -> None:
        self.k = k
        self.renderer = SmsRenderer(k.app)
        self.gates = build_gates(k)  # send windows, caps: holds before rendering
        cfg = k.config.sms
        self.quiet = parse_quiet_hours(cfg.quiet_hours)
        self.default_zone = default_zone(k.config.daemon.default_timezone)
        # Where the provider reports delivery (segflowd.delivery.smshooks): only with a
        # public URL, which the provider can reach.
        self.callback = (f"{public_url}/webhooks/{lane}/status"
                         if k.config.http.public_url else "")

    async def prepare(self, rows: Sequence[Mapping[str, Any]]) -> list[Prepared]:
        prepared = [Prepared(r) for r in rows]
        try:
            await self._gather(prepared)
            await apply_gates(self.gates, prepared, self.k.clock.now())
        except Exception as exc:  # the store or a gate failed: try again later
            for p in prepared:
                if p.status is None:
                    p.status, p.error = "retry", (
                        f"preparing the message: {type(exc).__name__}: {exc}")
            return prepared
        now = self.k.clock.now()
        for p in prepared:
            if p.status is None:
                self._finish(p, now)
        return prepared

    async def _gather(self, prepared: list[Prepared]) -> None:
        ids = sorted({str(p.row["user_id"]) for p in prepared if p.row["user_id"] is not None})
        found: dict[str, dict[str, Any]] = {}
        stopped: set[tuple[str, str]] = set()  # (user, topic): STOP, or a message's topic
        async with self.k.store.connect() as conn:
            if ids:
                for u in (await conn.execute(sa.select(users).where(
                        users.c.id.in_(ids)))).mappings():
                    found[u["id"]] = {**(u["attributes"] or {}), "id": u["id"],
                                      "email": u["email"]}
                # marketing ("unsubscribe from all") covers an SMS of a topic; a topic-less
                # marketing SMS answers to STOP alone, as before topics
                topics = sorted({SMS_TOPIC, MARKETING_TOPIC,
                                 *(t for p in prepared if (t := p.row.get("topic")))})
                stopped = {(str(u), str(t)) for u, t in (await conn.execute(sa.select(
                    subscriptions.c.user_id, subscriptions.c.topic).where(
                    subscriptions.c.user_id.in_(ids), subscriptions.c.topic.in_(topics),
                    subscriptions.c.unsubscribed_at.is_not(None)))).all()}
            for p in prepared:
                p.user = found.get(str(p.row["user_id"]), {})
                raw = p.row["to_address"] or p.user.get("phone")
                if raw is None or (isinstance(raw, str) and not raw.strip()):
                    p.status, p.error = "failed", "no phone number for this message's user"
                    continue
                if not isinstance(raw, str):
                    p.status, p.error = "failed", "the phone attribute is not a string"
                    continue
                number, problem = check_phone(raw.strip())
                if problem is not None:
                    p.status, p.error = "failed", problem
                    continue
                p.address = number
            numbers = sorted({p.address for p in prepared if p.status is None})
            blocked: dict[str, str] = {}
            if numbers:
                blocked = {str(a): str(r) for a, r in (await conn.execute(
                    sa.select(suppressions.c.address, suppressions.c.reason).where(
                        suppressions.c.address.in_(numbers)))).all()}
        for p in prepared:
            if p.status is not None:
                continue
            reason = blocked.get(p.address)
            if reason is not None:
                p.status, p.error = "suppressed", f"number suppressed ({reason})"
            elif p.row["kind"] not in MARKETING_KINDS or p.row["user_id"] is None:
                continue
            elif (str(p.row["user_id"]), SMS_TOPIC) in stopped:
                p.status, p.error = "suppressed", "user unsubscribed from SMS (STOP)"
            elif p.row.get("topic") and (why := blocked_by(stopped, p.row["user_id"],
                                                           p.row["topic"])) is not None:
                p.status, p.error = "suppressed", why

    def _finish(self, p: Prepared, now: dt.datetime) -> None:
        row = p.row
        marketing = row["kind"] in MARKETING_KINDS
        if marketing and self.quiet is not None:
            zone, fell_back = user_zone(p.user, self.default_zone)
            if fell_back:
                count_fallback(self.k.metrics, "quiet_hours")
            until = quiet_until(now, zone, self.quiet)
            if until is not None:
                p.status, p.hold_until = "hold", until
                p.error = f"held for quiet hours ({self.k.config.sms.quiet_hours} {zone})"
                return
        data: dict[str, Any] = dict(row["data"] or {})
        context = {**data, "data": data, "user": p.user,
                   "message": {"id": row["id"], "kind": row["kind"],
                               "campaign": row["campaign"], "template": row["template"]}}
        try:
            body = self.renderer.render(str(row["template"]), context)
        except TemplateError as exc:
            p.status, p.error = "failed", str(exc)
            return
        # The row's id rides in the callback's URL (Twilio signs it): a report finds its
        # message even when it comes before delivery recorded Twilio's answer.
        callback = f"{self.callback}?m={int(row['id'])}" if self.callback else ""
        p.message = OutgoingSms(id=int(row["id"]), to=p.address, body=body,
                                kind=str(row["kind"]), status_callback=callback)

