"""The rest of the Customer.io Track API: devices, suppression, merges, push metrics, v2.

Routes (Customer.io Basic auth, as the v1 routes of :mod:`segflowd.ingest.service`):

* ``PUT /api/v1/customers/{id}/devices``, ``DELETE .../devices/{token}``
  (:mod:`segflowd.ingest.devices`). Adding a device creates the user if needed, as an
  event does; a forgotten user's is refused (409) like their events;
* ``POST .../suppress``, ``.../unsuppress`` (:mod:`segflowd.ingest.push`). Customer.io's
  suppress also deletes the person; here the user is kept and only their address is
  suppressed. A user without an address is a 422 (nothing could be suppressed);
* ``POST /api/v1/merge_customers`` (:mod:`segflowd.ingest.merge`);
* ``POST /api/v1/push/events`` (:mod:`segflowd.ingest.push`);
* ``POST /api/v2/entity``, ``POST /api/v2/batch`` (:mod:`segflowd.ingest.cio_v2`).

A merge is one store transaction of its own, not a group commit: it first waits for
the writes already queued to commit (an empty group commit), then locks both users. The
committer's sinks are told as after a commit (the primary changed, the secondary was
deleted and left their segments), so the segment engine evaluates the primary at once.
The committer forgets that the secondary exists before the merge begins, so an event of
theirs flushed meanwhile makes the user again instead of naming a deleted one. Once the
flushes that ran during the merge are done, a gained attribute the primary lacks (an
identify flushed meanwhile read the attributes before the merge's commit and wrote them
back after) is written again through the committer; one an identify set stays.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import sqlalchemy as sa
import structlog

from .. import schema
from ..errors import StoreUnavailable
from ..hooks import IngestBatch
from ..http import HTTPError, Request, Response, Router, json_response
from ..kernel import Kernel
from . import cio_v2, merge, push
from .auth import Authenticator
from .committer import GroupCommitter
from .cors import CorsPolicy
from .devices import DeviceOp, apply_device_ops, parse_device, parse_token
from .merge import Merged
from .payloads import dedupe_key, field_error, opt_id, opt_time, require_id, require_object
from .users import check_email
from .writes import CommitResult, EventWrite, ForgetWrite, UserWrite, Write

__all__ = ["CustomerioTrack", "IngestRoutes"]

log = structlog.get_logger("segflowd.ingest")

Handler = Callable[[Request], Awaitable[Response]]

DEVICE_TRIES = 3  # device writes whose user was deleted (merged away) just before


class IngestRoutes(Protocol):
    """What these handlers use of :class:`~segflowd.ingest.service.IngestService`."""

    kernel: Kernel
    auth: Authenticator
    committer: GroupCommitter

    def _counted(self, api: str, handler: Handler) -> Handler: ...

    async def _body(self, request: Request) -> dict[str, object]: ...

    async def _event_limit(self, request: Request) -> int | None: ...

    async def _commit(self, writes: Sequence[Write], *,
                      batch: Mapping[str, object] | None = None) -> CommitResult: ...


class CustomerioTrack:
    """The handlers, over the ingest service's auth, body limits and committer."""

    def __init__(self, service: IngestRoutes) -> None:
        self.svc = service
        self.k = service.kernel
        self.k.metrics.describe("segflow_ingest_push_unknown_total", "counter",
                                "push events whose delivery_id is not a message of ours")

    def register_routes(self, router: Router, cors: CorsPolicy) -> None:
        """The routes; those a browser may call to track (they only write) with CORS."""
        counted = self.svc._counted
        for method, path, handler in (
                ("PUT", "/api/v1/customers/{id}/devices", self.put_device),
                ("POST", "/api/v1/push/events", self.push_event),
                ("POST", "/api/v2/entity", self.v2_entity),
                ("POST", "/api/v2/batch", self.v2_batch)):
            cors.add(router, method, path, counted("customerio", handler))
        for method, path, handler in (
                ("DELETE", "/api/v1/customers/{id}/devices/{token}", self.delete_device),
                ("POST", "/api/v1/customers/{id}/suppress", self.suppress),
                ("POST", "/api/v1/customers/{id}/unsuppress", self.unsuppress),
                ("POST", "/api/v1/merge_customers", self.merge)):
            router.add(method, path, counted("customerio", handler))

    # -- devices ---------------------------------------------------------------------

    async def put_device(self, request: Request) -> Response:
        self.svc.auth.customerio(request)
        uid = require_id(request.params["id"], "id")
        body = await self.svc._body(request)
        device = parse_device(body.get("device"), "device")
        await self._devices([UserWrite(uid, {})], [DeviceOp(uid, device=device)])
        return json_response({})

    async def delete_device(self, request: Request) -> Response:
        self.svc.auth.customerio(request, need="all")  # a delete: never a public key
        uid = require_id(request.params["id"], "id")
        token = parse_token(request.params["token"], "token")
        await self._devices([], [DeviceOp(uid, token=token)])
        return json_response({})

    async def _devices(self, writes: Sequence[Write], ops: Sequence[DeviceOp]) -> None:
        """Commit ``writes`` (making the users), then apply ``ops`` in one transaction."""
        if writes:
            await self.svc._commit(writes)
        for _ in range(DEVICE_TRIES):
            if not ops:
                return
            missing = await apply_device_ops(self.k.store, ops, self.k.clock.now())
            # Deleted between the commit and the device write: merged away (the id is
            # free: made again, as the commit did) or forgotten (the commit is a 409).
            ops = [op for op in ops if op.device is not None and op.user_id in missing]
            if ops:
                await self.svc._commit([UserWrite(uid, {})
                                        for uid in sorted({op.user_id for op in ops})])
        if ops:
            raise HTTPError(409, "user_forgotten", "the user was deleted (forgotten or "
                            "merged) each time the device was being added; nothing was "
                            "stored for them")

    # -- suppression -----------------------------------------------------------------

    async def _address(self, request: Request, what: str) -> tuple[str, str]:
        self.svc.auth.customerio(request, need="all")  # not for a browser's public key
        uid = require_id(request.params["id"], "id")
        u = schema.users
        async with self.k.store.connect() as conn:
            row = (await conn.execute(sa.select(u.c.email).where(u.c.id == uid))).first()
        if row is None:
            raise HTTPError(404, "not_found", f"no user {uid!r}")
        if not row.email:
            raise HTTPError(422, "no_email", f"user {uid!r} has no email address: there is "
                            f"nothing to {what} (the suppression list is by address)")
        return uid, str(row.email)

    async def suppress(self, request: Request) -> Response:
        uid, address = await self._address(request, "suppress")
        if await push.suppress(self.k.store, address, "Customer.io Track API suppress",
                               self.k.clock.now()):
            log.info("address.suppressed", reason=push.SUPPRESS_REASON,
                     source=push.SUPPRESS_SOURCE, user_id=uid)
            self.k.metrics.inc("segflow_suppressions_total", reason=push.SUPPRESS_REASON)
            self.k.bus.publish("address.suppressed", address=push.bare_address(address),
                               reason=push.SUPPRESS_REASON, source=push.SUPPRESS_SOURCE)
        return json_response({})

    async def unsuppress(self, request: Request) -> Response:
        _uid, address = await self._address(request, "unsuppress")
        kept = await push.unsuppress(self.k.store, address)
        if kept is not None:
            raise HTTPError(409, "suppressed", f"the address is suppressed for {kept!r}, "
                            "not by a suppress call: it stays on the list (an operator "
                            "removes it with `segflowd suppressions remove`)")
        return json_response({})

    # -- merge -----------------------------------------------------------------------

    async def merge(self, request: Request) -> Response:
        self.svc.auth.customerio(request, need="all")  # not for a browser's public key
        body = await self.svc._body(request)
        refs = {side: _person(body.get(side), side) for side in ("primary", "secondary")}
        ids = {side: await self._resolve(by, value, side) for side, (by, value) in refs.items()}
        if ids["primary"] == ids["secondary"]:
            raise field_error("secondary", "is the same user as the primary")
        await self.svc._commit(())  # what is queued for either user commits first
        # No await since that commit, so no flush began since: from here on an event of
        # the secondary makes the user (waiting for the merge's locks) instead of being
        # stored, as of a user known to exist, for one the merge deletes.
        self.svc.committer.unknown(ids["secondary"])
        now = self.k.clock.now()
        try:
            async with self.k.store.begin() as conn:
                done = await merge.merge_users(conn, ids["primary"], ids["secondary"], now)
        except merge.MergeError as exc:
            raise HTTPError(404, "not_found", f"{exc.field}: {exc}") from None
        self.svc.committer.announce(IngestBatch(  # as the committer's own commits do
            users=frozenset({done.primary}), events=(), deleted=frozenset({done.secondary}),
            left={done.secondary: done.left} if done.left else {}))
        if done.added:
            await self._reapply(done)
        log.info("user.merged", primary=done.primary, secondary=done.secondary,
                 events=done.events)
        return json_response({})

    async def _reapply(self, done: Merged) -> None:
        """Write again, through the committer, the gained attributes an identify undid.

        An identify of the primary flushed while the merge ran read their attributes
        before the merge committed (without a lock) and wrote them back after it. Once
        the flushes begun before now are done (an empty commit), each gained key the
        primary lacks is written again; one the primary has was set by an identify
        since, and keeps its value (the primary's own wins a merge).
        """
        u = schema.users
        try:
            await self.svc.committer.submit(())
            async with self.k.store.connect() as conn:
                row = (await conn.execute(sa.select(u.c.attributes)
                                          .where(u.c.id == done.primary))).first()
            have = {} if row is None else dict(row.attributes or {})
            lost = {k: v for k, v in done.added.items() if k not in have}
            if row is not None and lost:
                await self.svc.committer.submit([UserWrite(done.primary, lost)])
        except StoreUnavailable as exc:  # the merge itself is committed: answer so
            log.warning("user.merge_reapply_failed", primary=done.primary, error=str(exc))

    async def _resolve(self, by: str, value: str, field: str) -> str:
        """The user id of an ``id`` or ``email`` identifier; 404/409 when not one user."""
        if by == "id":
            return value
        found = await self._by_email([value])
        ids = found.get(value, [])
        if not ids:
            raise HTTPError(404, "not_found", f"{field}.email: no user has this address")
        if len(ids) > 1:
            raise HTTPError(409, "ambiguous", f"{field}.email: {len(ids)} users have this "
                            "address; name the user by id")
        return ids[0]

    async def _by_email(self, addresses: Sequence[str]) -> dict[str, list[str]]:
        u = schema.users
        out: dict[str, list[str]] = {}
        wanted = sorted(set(addresses))
        async with self.k.store.connect() as conn:
            for i in range(0, len(wanted), 500):
                for uid, addr in await conn.execute(
                        sa.select(u.c.id, u.c.email).where(u.c.email.in_(wanted[i:i + 500]))
                        .order_by(u.c.id)):
                    out.setdefault(str(addr), []).append(str(uid))
        return out

    # -- push metrics ----------------------------------------------------------------

    async def push_event(self, request: Request) -> Response:
        self.svc.auth.customerio(request)
        body = await self.svc._body(request)
        if body.get("delivery_id") in (None, ""):
            raise field_error("delivery_id", "is required")
        kind = push.PUSH_KINDS.get(str(body.get("event")))
        if kind is None:
            raise field_error("event", 'must be "opened", "converted" or "delivered"')
        opt_id(body.get("device_id"), "device_id")
        at = opt_time(body.get("timestamp"), "timestamp") or self.k.clock.now()
        message = push.message_id_of(body.get("delivery_id"))
        row = None if message is None else await push.record_push(
            self.k.store, message, kind, at)
        if row is None:
            self.k.metrics.inc("segflow_ingest_push_unknown_total")
        else:
            if kind == "open":
                self.k.bus.publish("message.opened", push=True, **row)
            self.k.metrics.inc("segflow_engagement_total", kind=kind)
        return json_response({})

    # -- Track API v2 ----------------------------------------------------------------

    async def v2_entity(self, request: Request) -> Response:
        self.svc.auth.customerio(request)
        body = await self.svc._body(request)
        limit = await self.svc._event_limit(request)
        await self._apply(self._allowed(request, [
            cio_v2.parse_entity(body, "body", max_event=limit)]))
        return json_response({})

    async def v2_batch(self, request: Request) -> Response:
        self.svc.auth.customerio(request)
        body = await self.svc._body(request)
        limit = await self.svc._event_limit(request)
        await self._apply(self._allowed(request, cio_v2.parse_batch(body, max_event=limit)))
        return json_response({})

    def _allowed(self, request: Request, entities: list[cio_v2.Entity]
                 ) -> list[cio_v2.Entity]:
        """``entities``, if the key may apply them all: a ``delete`` needs scope ``all``
        (a browser's public ``track`` key writes, it never deletes anyone)."""
        if any(e.action == "delete" for e in entities):
            self.svc.auth.customerio(request, need="all")
        return entities

    async def _apply(self, entities: Sequence[cio_v2.Entity]) -> None:
        """Resolve email identifiers, commit the writes, then the device changes."""
        emails = [e.email for e in entities if e.user_id is None and e.email]
        known = await self._by_email(emails) if emails else {}
        writes: list[Write] = []
        ops: list[DeviceOp] = []
        for e in entities:
            uid = e.user_id or _by_address(e, known)
            if e.action == "identify":
                attrs = dict(e.attributes)
                if e.email is not None:
                    attrs.setdefault("email", e.email)
                writes.append(UserWrite(uid, attrs))
            elif e.action == "delete":
                writes.append(ForgetWrite(uid))
            elif e.action == "add_device":
                writes.append(UserWrite(uid, {}))
                ops.append(DeviceOp(uid, device=e.device))
            elif e.action == "delete_device":
                ops.append(DeviceOp(uid, token=e.token))
            else:
                writes.append(EventWrite(
                    name=e.name or "", attributes=e.attributes, created_at=e.timestamp,
                    user_id=uid, dedupe_key=dedupe_key("c", uid, e.event_id, f"{e.field}.id")))
        await self._devices(writes, ops)


def _by_address(e: cio_v2.Entity, known: dict[str, list[str]]) -> str:
    """The user an email identifier names; an identify of a new address creates the user
    with the address as id (and remembers it for the rest of the batch)."""
    address = e.email or ""
    ids = known.get(address, [])
    if len(ids) > 1:
        raise HTTPError(409, "ambiguous", f"{e.field}.identifiers.email: {len(ids)} users "
                        "have this address; name the user by id")
    if ids:
        return ids[0]
    if e.action != "identify":
        raise HTTPError(404, "not_found", f"{e.field}.identifiers.email: no user has this "
                        "address (identify them first, or name them by id)")
    opt_id(address, f"{e.field}.identifiers.email")  # it becomes the user id: fits?
    known[address] = [address]
    return address


def _person(value: object, field: str) -> tuple[str, str]:
    """A merge side: ``{"id": ...}`` or ``{"email": ...}``."""
    ids = require_object(value, field)
    if "id" in ids:
        return "id", require_id(ids["id"], f"{field}.id")
    if "email" in ids:
        raw = ids["email"]
        if not isinstance(raw, str) or not raw.strip():
            raise field_error(f"{field}.email", "must be a non-empty string")
        address, problem = check_email(raw.strip())
        if problem is not None:
            raise field_error(f"{field}.email", problem)
        return "email", address
    if "cio_id" in ids:
        raise field_error(f"{field}.cio_id", 'is not supported: name the user by "id" or '
                          '"email"')
    raise field_error(field, 'must hold "id" or "email"')
