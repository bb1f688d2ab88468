"""Topics: who is subscribed to what, the check delivery makes, and the preference page.

A user is subscribed to a topic (``app.topic("newsletter")``) unless their row of that
topic in ``subscriptions`` has ``unsubscribed_at``; the topic ``marketing``
(:data:`~segflowd.appcraft.MARKETING_TOPIC`) is "unsubscribe from all". A campaign or
broadcast message with topic T is not sent to a user unsubscribed from T or from
marketing (:func:`blocked_by`); one without a topic only checks marketing; transactional
mail checks neither.

The unsubscribe link's page (``GET /u/{token}``, :func:`render_page`) shows every app
topic with its state and "unsubscribe from all", in a form whose ``POST`` saves the
choices (:func:`parse_form`); it carries a hidden ``prefs`` field, so a ``POST`` without
it is still RFC 8058's one-click, which turns off the message's own topic.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
from collections.abc import Collection, Iterable, Mapping, Sequence
from urllib.parse import parse_qsl

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from ..appcraft import MARKETING_TOPIC, TopicDef
from ..kernel import Kernel
from ..schema import messages, subscriptions
from ..store import Store
from ..userlocks import existing_users

__all__ = ["FORM_LIMIT", "PREFS_FIELD", "SHOWN_FIELD", "Preferences", "blocked_by",
           "link_alive", "message_topic", "opted_out", "parse_form", "publish_changes",
           "read_preferences", "render_page", "set_preferences"]

log = structlog.get_logger("segflowd.tracking")

FORM_LIMIT = 16_384  # bytes of a preference form's body, at most
PREFS_FIELD = "prefs"  # the hidden field that tells the page's form from a one-click POST
SHOWN_FIELD = "shown"  # a hidden field per topic the form shows: only those are changed
IN_CHUNK = 500  # user ids per IN (...) list

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport"
content="width=device-width, initial-scale=1"><meta name="robots" content="noindex">
<title>{title}</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:4em auto;padding:0 1em">
<h1 style="font-size:1.4em">{title}</h1>{body}</body></html>"""
_BUTTON = 'style="font-size:1em;padding:.5em 1.2em"'


@dataclasses.dataclass(frozen=True)
class Preferences:
    """A user's subscriptions: ``all`` False when unsubscribed from all marketing mail;
    ``topics`` maps each app topic to True when subscribed."""

    all: bool
    topics: dict[str, bool]

    def as_json(self, user_id: str) -> dict[str, object]:
        return {"user_id": user_id, "all": self.all, "topics": dict(self.topics)}


async def opted_out(conn: AsyncConnection, user_ids: Sequence[str],
                    topics: Iterable[str | None]) -> set[tuple[str, str]]:
    """The (user, topic) pairs of ``user_ids`` unsubscribed from marketing or one of
    ``topics``: one query per :data:`IN_CHUNK` users."""
    wanted = sorted({MARKETING_TOPIC, *(t for t in topics if t)})
    s = subscriptions.c
    out: set[tuple[str, str]] = set()
    ids = sorted(set(user_ids))
    for i in range(0, len(ids), IN_CHUNK):
        out.update((str(u), str(t)) for u, t in (await conn.execute(
            sa.select(s.user_id, s.topic).where(
                s.user_id.in_(ids[i:i + IN_CHUNK]), s.topic.in_(wanted),
                s.unsubscribed_at.is_not(None)))).all())
    return out


def blocked_by(out: Collection[tuple[str, str]], user_id: object,
               topic: object) -> str | None:
    """Why a marketing message of ``topic`` must not go to ``user_id`` (None: it may)."""
    if user_id is None:
        return None
    if (str(user_id), MARKETING_TOPIC) in out:
        return "user unsubscribed from marketing messages"
    if topic and (str(user_id), str(topic)) in out:
        return f"user unsubscribed from topic {topic!r}"
    return None


async def read_preferences(conn: AsyncConnection, user_id: str,
                           topics: Iterable[str]) -> Preferences:
    """``user_id``'s state of marketing and of each of ``topics``."""
    names = list(topics)
    off = {str(t) for t in (await conn.execute(sa.select(subscriptions.c.topic).where(
        subscriptions.c.user_id == user_id,
        subscriptions.c.topic.in_([MARKETING_TOPIC, *names]),
        subscriptions.c.unsubscribed_at.is_not(None)))).scalars()}
    return Preferences(all=MARKETING_TOPIC not in off,
                       topics={t: t not in off for t in names})


async def set_preferences(conn: AsyncConnection, store: Store, user_id: str,
                          changes: Mapping[str, bool], now: dt.datetime) -> dict[str, bool] | None:
    """Subscribe (True) or unsubscribe (False) ``user_id`` from each topic of ``changes``
    (``marketing`` for all); the changes that were not already so. None, with nothing
    written, when the user does not exist: a forgotten user's old link must not name
    them again, nor unsubscribe whoever signs up under the id next."""
    if not await existing_users(conn, [user_id]):
        return None
    s = subscriptions.c
    rows = {str(r.topic): r.unsubscribed_at for r in await conn.execute(
        sa.select(s.topic, s.unsubscribed_at).where(
            s.user_id == user_id, s.topic.in_(sorted(changes))))}
    changed: dict[str, bool] = {}
    for topic, on in sorted(changes.items()):
        if topic in rows:
            if (rows[topic] is None) == on:
                continue
            await conn.execute(sa.update(subscriptions).where(
                s.user_id == user_id, s.topic == topic).values(
                unsubscribed_at=None if on else now, updated_at=now))
        elif on:
            continue  # no row: subscribed already
        else:
            await conn.execute(store.insert_ignore(subscriptions).values(
                user_id=user_id, topic=topic, unsubscribed_at=now, updated_at=now))
        changed[topic] = on
    return changed


def publish_changes(k: Kernel, user_id: str, changed: Mapping[str, bool]) -> None:
    """Log and publish each change: ``user.unsubscribed`` or ``user.resubscribed``."""
    for topic, on in sorted(changed.items()):
        event = "user.resubscribed" if on else "user.unsubscribed"
        log.info(event, user_id=user_id, topic=topic)
        k.bus.publish(event, user_id=user_id, topic=topic)
        if not on:
            k.metrics.inc("segflow_unsubscribes_total")


async def link_alive(conn: AsyncConnection, user_id: str, message_id: object) -> bool:
    """Whether a link of ``message_id`` for ``user_id`` may still act for that user: not
    when its message now belongs to no one or someone else (a forget cleared it; whoever
    signs up under the id next is another person). A message since pruned cannot tell:
    the link stays valid."""
    try:
        mid = int(str(message_id))
    except ValueError:
        return True
    owner = (await conn.execute(sa.select(messages.c.user_id).where(
        messages.c.id == mid))).first()
    return owner is None or owner[0] == user_id


async def message_topic(conn: AsyncConnection, message_id: object) -> str:
    """The topic a one-click unsubscribe from this message turns off: its own, or
    marketing when it has none (or it is gone)."""
    if message_id is None:
        return MARKETING_TOPIC
    try:
        mid = int(str(message_id))
    except ValueError:
        return MARKETING_TOPIC
    topic = (await conn.execute(sa.select(messages.c.topic).where(
        messages.c.id == mid))).scalar_one_or_none()
    return str(topic) if topic else MARKETING_TOPIC


def parse_form(body: bytes, topics: Iterable[str]) -> dict[str, bool] | None:
    """The choices a preference form posts (each app topic the form showed, and
    ``marketing``: True to stay subscribed), or None when ``body`` is not that form (a
    one-click POST). A topic not in ``topics`` is ignored."""
    fields = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    if not any(k == PREFS_FIELD for k, _ in fields):
        return None
    checked = {v for k, v in fields if k == "topic"}
    shown = {v for k, v in fields if k == SHOWN_FIELD}
    # A topic added since the page was rendered had no box: it is left as it is.
    choices = {t: t in checked for t in topics if not shown or t in shown}
    choices[MARKETING_TOPIC] = not any(k == "all" for k, _ in fields)
    return choices


def render_page(topics: Mapping[str, TopicDef], prefs: Preferences | None, *,
                own_topic: str = MARKETING_TOPIC, notice: str = "") -> bytes:
    """The preference page: each topic's checkbox, "unsubscribe from all" and a save
    button, then a one-click button for the message's own topic (named even when the
    app no longer defines it). Without ``prefs`` (a link to an address, not a user) only
    the one-click button, which suppresses the address. A hidden :data:`SHOWN_FIELD` per
    topic lets :func:`parse_form` leave alone a topic added after the page was shown."""
    e = html.escape
    parts = [f"<p><strong>{e(notice)}</strong></p>"] if notice else []
    parts.append("<p>Choose the email you get from us. Messages you ask for (receipts, "
                 "password resets) always arrive.</p>")
    if prefs is not None:
        rows = [f'<form method="post"><input type="hidden" name="{PREFS_FIELD}" value="1">']
        for name, t in sorted(topics.items()):
            checked = " checked" if prefs.topics.get(name, True) else ""
            desc = f'<br><small>{e(t.description)}</small>' if t.description else ""
            rows.append(f'<input type="hidden" name="{SHOWN_FIELD}" value="{e(name)}">')
            rows.append(f'<p><label><input type="checkbox" name="topic" value="{e(name)}"'
                        f'{checked}> {e(t.title)}</label>{desc}</p>')
        checked = "" if prefs.all else " checked"
        rows.append(f'<p><label><input type="checkbox" name="all" value="off"{checked}> '
                    'Unsubscribe from all marketing email</label></p>'
                    f'<button type="submit" {_BUTTON}>Save preferences</button></form>')
        parts.append("".join(rows))
    own = topics.get(own_topic)
    if prefs is None or own_topic == MARKETING_TOPIC:  # a link to an address suppresses
        what = "all marketing email"  # it, whatever the message's topic
    elif own is not None:
        what = f"“{e(own.title)}”"
    else:  # a topic the app no longer defines (queued before a deploy): still only it
        what = f"“{e(own_topic)}” email"
    parts.append(f'<form method="post"><p>Or in one click:</p><button type="submit" '
                 f'{_BUTTON}>Unsubscribe from {what}</button></form>')
    return _PAGE.format(title="Email preferences", body="".join(parts)).encode()
