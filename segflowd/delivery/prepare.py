"""Preparing a claimed batch: what each message needs, whether it may go out, its MIME.

Three queries read the batch's users, their marketing and topic unsubscribes
(:mod:`segflowd.delivery.preferences`) and the suppressed addresses; context providers add
their data; then every message still to send is rendered (in a worker thread, or by the
render processes where there are some) and built into an
:class:`~segflowd.providers.OutgoingMessage` with its tracking links and unsubscribe URL.
A message that must not be sent gets its status here instead: ``failed`` (no address, or
one that is not valid or cannot be sent, checked before any work and without contacting
the provider; a template error; a header that cannot go out; or any other error
rendering or building that one message: the rest of the batch goes on),
``suppressed`` (the address or the user opted out) or ``retry`` (the store or a context
provider failed).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import sqlalchemy as sa
import structlog

from ..errors import TemplateError
from ..hooks import ContextProvider
from ..ingest.users import check_email
from ..kernel import Kernel
from ..providers import MARKETING_KINDS, OutgoingMessage, OutgoingSms
from ..schema import suppressions, users
from .gates import apply_gates, build_gates
from .mime import (
    InvalidAddress,
    InvalidMessage,
    MessageParts,
    build_message,
    make_message_id,
    parse_address,
)
from .outbox import SEND_KEY_PREFIX
from .preferences import blocked_by, opted_out
from .renderpool import (
    RenderJob,
    RenderPool,
    RenderPoolError,
    RenderPoolRetry,
    RenderResult,
    render_jobs,
)
from .templates import OVERRIDES, Rendered, Renderer, add_tracking, sample_user
from .tokens import Signer

__all__ = ["BatchPreparer", "Prepared", "bare_address"]

log = structlog.get_logger("segflowd.delivery")



@dataclasses.dataclass
class Prepared:
    """One claimed row on its way: its message to send, or the status decided instead."""

    row: Mapping[str, Any]
    user: dict[str, Any] = dataclasses.field(default_factory=dict)
    address: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: OutgoingMessage | OutgoingSms | None = None
    # decided without sending: failed | suppressed | retry | hold (until hold_until)
    status: str | None = None
    error: str | None = None
    hold_until: dt.datetime | None = None  # "hold": queued again for then, no attempt spent


class BatchPreparer:
    """Turns the delivery service's claimed rows into :class:`Prepared` messages."""

    def __init__(self, k: Kernel, *, context_providers: list[ContextProvider],
                 renderer: Renderer, render_pool: RenderPool | None, signer: Signer,
                 public_url: str, sender_domain: str) -> None:
        self.k = k
        # Kept by reference: services built later may still append.
        self.context_providers = context_providers
        self.renderer = renderer
        self.render_pool = render_pool
        self.signer = signer
        self.public_url = public_url
        self._sender_domain = sender_domain
        self.gates = build_gates(k)  # send windows, caps: holds before rendering

    async def prepare(self, rows: Sequence[Mapping[str, Any]]) -> list[Prepared]:
        """Read what the batch needs in three queries, then render it off the event loop."""
        prepared = [Prepared(r) for r in rows]
        try:
            await self._gather(prepared)
            await apply_gates(self.gates, prepared, self.k.clock.now())
        except Exception as exc:  # the store or a context provider failed: try again later
            for p in prepared:
                if p.status is None:
                    p.status = "retry"
                    p.error = f"preparing the message: {type(exc).__name__}: {exc}"
            return prepared
        # Rendering is CPU work (Jinja2, css-inline, the text part): a worker thread keeps
        # the event loop (ingest, the control socket) responsive meanwhile, and hands the
        # batch to the render processes where there are some.
        # With render processes, a cancelled worker (a drain cut short) does not wait for
        # the thread: the service then closes the pool, which ends the thread at once.
        await anyio.to_thread.run_sync(self._render_all, prepared,
                                       abandon_on_cancel=self.render_pool is not None)
        return prepared

    async def _gather(self, prepared: list[Prepared]) -> None:
        user_ids = sorted({str(p.row["user_id"]) for p in prepared
                           if p.row["user_id"] is not None})
        found: dict[str, dict[str, Any]] = {}
        unsubscribed: set[tuple[str, str]] = set()  # (user, topic): see preferences
        async with self.k.store.connect() as conn:
            if user_ids:
                for u in (await conn.execute(sa.select(users).where(
                        users.c.id.in_(user_ids)))).mappings():
                    found[u["id"]] = {**(u["attributes"] or {}), "id": u["id"],
                                      "email": u["email"]}
                unsubscribed = await opted_out(conn, user_ids,
                                               {p.row.get("topic") for p in prepared})
            for p in prepared:
                p.user = found.get(str(p.row["user_id"]), {})
                p.address = str(p.row["to_address"] or p.user.get("email") or "")
            addresses = sorted({bare_address(p.address) for p in prepared if p.address})
            suppressed: dict[str, str] = {}
            if addresses:
                result = await conn.execute(
                    sa.select(suppressions.c.address, suppressions.c.reason).where(
                        suppressions.c.address.in_(addresses)))
                suppressed = {str(a): str(r) for a, r in result.all()}
        for p in prepared:
            row = p.row
            if not p.address:
                p.status, p.error = "failed", "no email address for this message's user"
                continue
            problem = _address_problem(p.address)  # before any work, and no send
            if problem is not None:
                p.status, p.error = "failed", problem
                continue
            reason = suppressed.get(bare_address(p.address))
            if reason is not None:
                p.status, p.error = "suppressed", f"address suppressed ({reason})"
            elif row["kind"] in MARKETING_KINDS and (why := blocked_by(
                    unsubscribed, row["user_id"], row.get("topic"))) is not None:
                p.status, p.error = "suppressed", why
            else:
                data: dict[str, Any] = dict(row["data"] or {})
                if row["user_id"] is not None:
                    for cp in self.context_providers:
                        data.update(await cp.context_for(str(row["user_id"]), data))
                p.data = data

    def _render_all(self, prepared: list[Prepared]) -> None:
        jobs: list[RenderJob] = []
        unsubs: list[str] = []
        todo: list[Prepared] = []
        for p in prepared:
            if p.status is not None:
                continue
            try:
                job, unsub = self._job(p)
            except Exception as exc:  # a fault of ours: this message fails, not the batch
                p.status, p.error = "failed", _unexpected("preparing the message", exc)
                continue
            todo.append(p)
            jobs.append(job)
            unsubs.append(unsub)
        results: list[RenderResult] | None = None
        if self.render_pool is not None and jobs:
            # A message that hangs or kills its worker comes back as its own failure;
            # the pool refuses a batch only when no message is at fault.
            try:
                results = self.render_pool.render_many(jobs)
            except RenderPoolRetry as exc:  # stopping, or a batch no worker can finish:
                # queued again, never rendered here (one of its messages may hang or kill)
                for p in todo:
                    p.status, p.error = "retry", str(exc)
                return
            except RenderPoolError as exc:  # nothing rendered there: rendered here instead
                log.warning("delivery.render_pool_failed", error=str(exc))
        if results is None:
            results = render_jobs(self.renderer, jobs)
        for p, result, unsub in zip(todo, results, unsubs, strict=True):
            if isinstance(result, TemplateError):
                p.status, p.error = "failed", str(result)
                continue
            try:
                p.message = self._build(p, result, unsub)
            except InvalidMessage as exc:  # a bad address or header: this message alone
                p.status, p.error = "failed", str(exc)
            except Exception as exc:  # e.g. a value that cannot be encoded: nothing went out
                p.status, p.error = "failed", _unexpected("building the message", exc)

    def _job(self, p: Prepared) -> tuple[RenderJob, str]:
        """The template and context to render ``p`` with, and its unsubscribe URL."""
        row, user, data, address = p.row, dict(p.user), p.data, p.address
        unsub = ""
        if row["kind"] in MARKETING_KINDS:
            claims: dict[str, str | int] = {"m": int(row["id"])}
            if row["user_id"] is not None:
                claims["u"] = str(row["user_id"])
            else:
                claims["a"] = bare_address(address)
            unsub = f"{self.public_url}/u/{self.signer.sign('u', claims)}"
        if row["kind"] == "test":  # a test send fills what it lacks with sample values
            sample = sample_user()
            sample.update(user or {"email": address})
            user = sample
        overrides = data.get(OVERRIDES)
        if overrides is not None:  # a send's own subject/body; data from elsewhere (an
            # event's attributes) never gets to replace what the app's template says
            data = {k: v for k, v in data.items() if k != OVERRIDES}
            if not str(row["dedupe_key"] or "").startswith(SEND_KEY_PREFIX):
                overrides = None
        context = {**data, "data": data, "user": user,
                   "message": {"id": row["id"], "kind": row["kind"],
                               "campaign": row["campaign"], "template": row["template"]},
                   "unsubscribe_url": unsub}
        if overrides is not None:
            context[OVERRIDES] = overrides
        return (str(row["template"]), context), unsub

    def _build(self, p: Prepared, rendered: Rendered, unsub: str) -> OutgoingMessage:
        row, address = p.row, p.address
        html = rendered.html
        if self._tracks(row):
            mid = int(row["id"])
            html = add_tracking(
                html,
                lambda url: f"{self.public_url}/t/c/{self.signer.sign('c', {'m': mid, 'l': url})}",
                f"{self.public_url}/t/o/{self.signer.sign('o', {'m': mid})}")
        ecfg = self.k.config.email
        return build_message(MessageParts(
            row_id=int(row["id"]), kind=row["kind"], sender=ecfg.from_, to=address,
            subject=rendered.subject, html=html, text=rendered.text,
            message_id=row["message_id"] or make_message_id(int(row["id"]), self._sender_domain),
            date=self.k.clock.now(), reply_to=ecfg.reply_to, unsubscribe_url=unsub,
            unsubscribe_mailto=ecfg.unsubscribe_mailto))

    def _tracks(self, row: Mapping[str, Any]) -> bool:
        tpl = self.k.app.templates.get(row["template"])
        if tpl is not None and tpl.track is not None:
            return tpl.track
        camp = self.k.app.campaigns.get(row["campaign"] or "")
        if camp is not None and camp.track is not None:
            return camp.track
        return self.k.config.email.track


def _address_problem(address: str) -> str | None:
    """Why ``address`` cannot be mailed, or None: it must be one address Segflow can send
    to (an ASCII local part; an internationalised domain goes as IDNA) and a valid one
    (the check ingest makes, which ``GET /v1/users/{id}`` shows as ``email_error``)."""
    problem = check_email(address.strip())[1]
    if problem is not None:
        return f"recipient {problem}"
    try:
        parse_address(address, "recipient")
    except InvalidAddress as exc:
        return str(exc)
    return None


def _unexpected(doing: str, exc: Exception) -> str:
    log.warning("delivery.message_error", doing=doing, error=f"{type(exc).__name__}: {exc}")
    return f"{doing} failed: {type(exc).__name__}: {exc}"


def bare_address(address: str) -> str:
    """The lower-cased addr-spec of ``Name <a@b>`` (the suppression list's key)."""
    return email.utils.parseaddr(address)[1].strip().lower() or address.strip().lower()
