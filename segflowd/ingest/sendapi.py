"""The send routes: Customer.io's App API ``POST /v1/send/email`` and the native
``POST /v1/send/{template}``.

Both queue one transactional message in the outbox (a ``messages`` row of kind
``transaction``), so it goes the way of any transactional mail: rendered and sent by
delivery with its retries, never to a suppressed address (bounce, complaint, manual),
and without a marketing unsubscribe link. A 2xx means the row is committed.

* The message is a template or a transaction of the app: the name is looked up among the
  transactions first (the row then names the transaction and its template), then the
  templates. An unknown name is a 400.
* The recipient is a user (``user_id``, or the App API's ``identifiers`` ``{"id"}`` or
  ``{"email"}``, looked up by email) and/or an address ``to``, which wins over the
  user's email. A user who does not exist is fine when ``to`` is given (the message then
  has no user); without ``to`` it is a 400.
* The data (``message_data``, ``data``) is the template's context beside ``user``.
* An ``Idempotency-Key`` header is the message's dedupe key: a repeated key queues
  nothing and answers the first message again (Customer.io has no such header).
* ``send_to_unsubscribed`` (App API, default true as in Customer.io): false leaves a
  user who unsubscribed from marketing mail unsent (the row is ``suppressed``). A
  transactional message never looks at that unsubscribe otherwise; the suppression list
  is always honoured, whatever this says.
* ``disable_message_retention`` (App API): the row's data is emptied once its outcome is
  recorded (``sent``, ``failed``, ``suppressed`` or ``unknown``), so what the template
  was given is not kept; see :meth:`SendAPI.forget_data`.
* ``subject`` and ``body`` (App API): the send's own subject and HTML body, Jinja2
  templates over the same context (``message_data`` beside ``user``), rendered in a
  sandbox instead of the template's; the text part is made from that HTML. A syntax
  error is a 400 naming the field. Only a send's row (its ``send:`` dedupe key) may carry
  them: the same key in an event's attributes never replaces a template's text.
* Fields that would change the mail in ways Segflow cannot honour (``from``, ``bcc``,
  ``attachments``, ...) are refused with a 400 naming them, never silently ignored.

Auth: ``Authorization: Bearer <secret>`` of a key of scope ``app`` or ``all``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Mapping, Sequence

import anyio
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from ..appcraft import MARKETING_TOPIC
from ..bus import Subscription
from ..delivery.outbox import SEND_KEY_PREFIX, enqueue
from ..delivery.templates import OVERRIDES, override_problem
from ..hooks import OutboxWaker
from ..http import HTTPError, Request, Response, json_response
from ..kernel import Kernel
from ..schema import messages, subscriptions, users
from .auth import Authenticator
from .payloads import check_size, field_error, opt_id, opt_object, require_id, require_object
from .users import check_email

__all__ = ["QueuedSend", "SendAPI", "SendRequest"]

log = structlog.get_logger("segflowd.ingest")

MAX_IDEMPOTENCY_KEY = 200  # characters of an Idempotency-Key header
DEDUPE_PREFIX = SEND_KEY_PREFIX  # messages.dedupe_key of a send: the key or a random one
MAX_OVERRIDE = 100_000  # characters of a subject or body given in a send
NO_RETENTION = "$no_retention"  # data key marking a message whose data goes after sending
FINAL = frozenset({"message.sent", "message.failed", "message.suppressed", "message.unknown"})
_APP_FIELDS = frozenset({"transactional_message_id", "to", "identifiers", "message_data",
                         "subject", "body", "send_to_unsubscribed",
                         "disable_message_retention"})
_NATIVE_FIELDS = frozenset({"user_id", "to", "data"})


@dataclasses.dataclass(frozen=True)
class SendRequest:
    """One validated send: what the routes parse and :meth:`SendAPI.queue` commits."""

    name: str  # a transaction or template name
    field: str  # where the name came from, for the 400
    user_id: str | None = None
    email: str | None = None  # identifiers.email: the user is looked up by it
    to: str | None = None
    data: Mapping[str, object] = dataclasses.field(default_factory=dict)
    send_to_unsubscribed: bool = True
    retain: bool = True
    idempotency_key: str | None = None


@dataclasses.dataclass(frozen=True)
class QueuedSend:
    """A send's message: its row id, when it was queued, its status now, and whether an
    earlier send of the same Idempotency-Key queued it."""

    id: int
    queued_at: dt.datetime
    status: str
    duplicate: bool


class SendAPI:
    """The send routes' handlers (registered by the ingest service)."""

    def __init__(self, kernel: Kernel, auth: Authenticator, *, max_request: int,
                 max_event: int, wakers: Sequence[OutboxWaker] = ()) -> None:
        self.k = kernel
        self.auth = auth
        self.max_request = max_request
        self.max_event = max_event
        self.wakers = wakers
        self._no_retention: set[int] = set()  # queued here, data to drop at the outcome
        self._sub: Subscription | None = None
        self._closed = False

    # -- routes ----------------------------------------------------------------------

    async def cio_send_email(self, request: Request) -> Response:
        """``POST /v1/send/email``: ``{"delivery_id", "queued_at"}`` like Customer.io."""
        self.auth.native(request, need="app")
        body = await self._body(request)
        unknown = sorted(set(body) - _APP_FIELDS)
        if unknown:
            raise field_error(unknown[0], "is not supported by Segflow's App API (the "
                              "config decides the sender); supported: "
                              + ", ".join(sorted(_APP_FIELDS)))
        name = body.get("transactional_message_id")
        if isinstance(name, int) and not isinstance(name, bool):
            name = str(name)
        ids = require_object(body.get("identifiers", {}), "identifiers")
        extra = sorted(set(ids) - {"id", "email"})
        if extra:
            raise field_error(f"identifiers.{extra[0]}", 'use "id" or "email"')
        send = SendRequest(
            name=_name(name, "transactional_message_id"), field="transactional_message_id",
            user_id=opt_id(ids.get("id"), "identifiers.id"),
            email=_opt_email(ids.get("email"), "identifiers.email"),
            to=_opt_email(body.get("to"), "to"),
            data=_with_overrides(opt_object(body.get("message_data"), "message_data"), body),
            send_to_unsubscribed=_opt_bool(body, "send_to_unsubscribed", True),
            retain=not _opt_bool(body, "disable_message_retention", False),
            idempotency_key=_idempotency(request))
        if send.user_id is None and send.email is None and send.to is None:
            raise field_error("identifiers", 'give identifiers ({"id"} or {"email"}) or "to"')
        done = await self.queue(send)
        return json_response({"delivery_id": str(done.id),
                              "queued_at": int(done.queued_at.replace(
                                  tzinfo=dt.UTC).timestamp())})

    async def native_send(self, request: Request) -> Response:
        """``POST /v1/send/{template}``: 202 ``{"message", "status", "duplicate"}``."""
        self.auth.native(request, need="app")
        template = request.params["template"]
        body = await self._body(request)
        unknown = sorted(set(body) - _NATIVE_FIELDS)
        if unknown:
            raise field_error(unknown[0], "unknown field; a send takes user_id, to and data")
        send = SendRequest(
            name=_name(template, "template"), field="template",
            user_id=opt_id(body.get("user_id"), "user_id"),
            to=_opt_email(body.get("to"), "to"),
            data=opt_object(body.get("data"), "data"),
            idempotency_key=_idempotency(request))
        if send.user_id is None and send.to is None:
            raise field_error("user_id", 'give "user_id" or "to"')
        done = await self.queue(send)
        return json_response({"message": done.id, "status": done.status,
                              "duplicate": done.duplicate}, status=202)

    async def _body(self, request: Request) -> dict[str, object]:
        body = require_object(await request.json(self.max_request), "body")
        check_size(body, self.max_event, "body")
        return body

    # -- queueing --------------------------------------------------------------------

    def _resolve(self, send: SendRequest) -> tuple[str, str | None]:
        """The template and transaction ``send.name`` stands for; 400 when neither."""
        app = self.k.app
        tx = app.transactions.get(send.name)
        if tx is not None:
            return tx.template, tx.name
        if send.name in app.templates:
            return send.name, None
        raise field_error(send.field, f"no transaction or template {send.name!r} in the app")

    async def queue(self, send: SendRequest) -> QueuedSend:
        """Commit ``send``'s message row (or find the one of its idempotency key)."""
        template, transaction = self._resolve(send)
        key = DEDUPE_PREFIX + (send.idempotency_key or uuid.uuid4().hex)
        data = dict(send.data) if send.retain else {**send.data, NO_RETENTION: True}
        now = self.k.clock.now()
        try:
            async with self.k.store.begin() as conn:
                found = await _by_key(conn, key)
                if found is not None:
                    return found
                user_id, to, unsubscribed = await _recipient(conn, send)
                mid = await enqueue(conn, kind="transaction", template=template, now=now,
                                    user_id=user_id, dedupe_key=key, to_address=to,
                                    data=data, transaction=transaction)
                assert mid is not None  # the key was looked up in this transaction
                status = "queued"
                if unsubscribed and not send.send_to_unsubscribed:
                    status = "suppressed"
                    await conn.execute(sa.update(messages).where(messages.c.id == mid).values(
                        status=status, next_attempt_at=None,
                        data=data if send.retain else {}, last_error=(
                            "the user unsubscribed from marketing mail and the send said "
                            "send_to_unsubscribed: false")))
        except sa.exc.IntegrityError:  # the same key queued at the same time: theirs holds
            async with self.k.store.connect() as conn:
                found = await _by_key(conn, key)
            if found is None:
                raise
            return found
        if not send.retain and status == "queued":
            self._no_retention.add(mid)
        log.info("send.queued", message_id=mid, template=template, transaction=transaction,
                 user_id=user_id, status=status)
        if status == "queued":
            for waker in self.wakers:
                waker.wake()
        return QueuedSend(mid, now, status, False)

    # -- disable_message_retention ---------------------------------------------------

    async def forget_data(self) -> None:
        """Run until cancelled: empty the data of no-retention messages at their outcome.

        Driven by delivery's ``message.*`` bus events for the messages queued by this
        process (one suppressed when queued is stored without data). A message whose
        outcome comes after a restart, or whose event a full bus buffer dropped, keeps
        its data until retention prunes the row.
        """
        if self._closed:
            return
        self._sub = sub = self.k.bus.subscribe(kinds=FINAL)
        try:
            while True:
                try:
                    event, _ = await sub.receive()
                except anyio.EndOfStream:  # close(): the daemon drains
                    return
                mid = event.data.get("message")
                if isinstance(mid, int) and mid in self._no_retention:
                    await self._empty(mid)
        finally:
            sub.close()

    def close(self) -> None:
        """Stop :meth:`forget_data` (the ingest service's drain)."""
        self._closed = True
        if self._sub is not None:
            self._sub.close()

    async def _empty(self, mid: int) -> None:
        try:
            async with self.k.store.begin() as conn:
                done = await conn.execute(sa.update(messages).where(
                    messages.c.id == mid, messages.c.status != "queued").values(data={}))
        except Exception as exc:  # the store went away: the row keeps its data for now
            log.warning("send.retention_error", message_id=mid,
                        error=f"{type(exc).__name__}: {exc}")
            return
        if done.rowcount:
            self._no_retention.discard(mid)


async def _by_key(conn: AsyncConnection, key: str) -> QueuedSend | None:
    row = (await conn.execute(sa.select(messages.c.id, messages.c.created_at,
                                        messages.c.status)
                              .where(messages.c.dedupe_key == key))).first()
    if row is None:
        return None
    return QueuedSend(int(row.id), row.created_at, str(row.status), True)


async def _recipient(conn: AsyncConnection, send: SendRequest
                     ) -> tuple[str | None, str | None, bool]:
    """The message's user id (None: no such user), its address (None: the user's email)
    and whether the user unsubscribed from marketing mail.

    A user id that matches nobody is a 400 unless ``to`` is given; an unknown
    ``identifiers.email`` is the address itself.
    """
    if send.user_id is None and send.email is None:
        return None, send.to, False
    where = (users.c.id == send.user_id if send.user_id is not None
             else users.c.email == send.email)
    # Share-locked (segflowd.userlocks): a forget or merge deleting the user either
    # committed (no user here) or waits for this row and then clears or moves it.
    row = (await conn.execute(sa.select(users.c.id, users.c.email).where(where)
                              .order_by(users.c.id).with_for_update(read=True))).first()
    if row is None:
        if send.to is None and send.user_id is not None:
            field = "user_id" if send.field == "template" else "identifiers.id"
            raise field_error(field, f'no user {send.user_id!r}; give "to" to send to an '
                              "address")
        return None, send.to or send.email, False
    uid = str(row.id)
    if send.to is None and not row.email:
        raise field_error("to", f'user {uid!r} has no email address: give "to"')
    unsubscribed = (await conn.execute(sa.select(subscriptions.c.user_id).where(
        subscriptions.c.user_id == uid, subscriptions.c.topic == MARKETING_TOPIC,
        subscriptions.c.unsubscribed_at.is_not(None)))).first() is not None
    return uid, send.to, unsubscribed


def _name(value: object, field: str) -> str:
    out = require_id(value, field)
    if len(out) > 200:
        raise field_error(field, "is too long")
    return out


def _with_overrides(data: Mapping[str, object], body: Mapping[str, object]
                    ) -> Mapping[str, object]:
    """``data`` with the send's own ``subject``/``body`` (Jinja2 source, checked here: a
    syntax error is the caller's 400, not a failed message later) under OVERRIDES."""
    given: dict[str, str] = {}
    for field in ("subject", "body"):
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise field_error(field, "must be a non-empty string (a Jinja2 template)")
        if len(value) > MAX_OVERRIDE:
            raise field_error(field, f"must be at most {MAX_OVERRIDE} characters")
        problem = override_problem(value)
        if problem is not None:
            raise field_error(field, f"is not a valid template: {problem}")
        given[field] = value
    return {**data, OVERRIDES: given} if given else data


def _opt_email(value: object, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise field_error(field, "must be an email address (a string)")
    address, problem = check_email(value.strip())
    if problem is not None:
        raise field_error(field, problem)
    return address


def _opt_bool(body: Mapping[str, object], field: str, default: bool) -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise field_error(field, "must be true or false")
    return value


def _idempotency(request: Request) -> str | None:
    value = request.headers.get("idempotency-key", "").strip()
    if not value:
        return None
    if len(value) > MAX_IDEMPOTENCY_KEY or not value.isprintable():
        raise HTTPError(400, "invalid_field", (
            f"Idempotency-Key: must be printable and at most {MAX_IDEMPOTENCY_KEY} "
            "characters"))
    return value

