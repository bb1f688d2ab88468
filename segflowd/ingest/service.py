"""The ingest service: the native, Segment and Customer.io HTTP APIs over one committer.

Every write route parses and validates the whole request first (400/413 before anything
is queued), then waits for the group committer: a 2xx means the request's data is
committed. The store being down is a 503 with ``Retry-After`` and nothing written.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio
import structlog
from anyio.abc import TaskStatus

from ..errors import IngestError, StoreUnavailable
from ..hooks import IngestBatch, IngestSink, OutboxWaker
from ..http import HTTPError, Request, Response, Router, json_response
from ..kernel import Kernel
from ..metrics import COMMIT_BUCKETS, INGEST_BUCKETS
from . import cio_api, segment_api, unrouted, users
from .auth import Authenticator
from .cio_track import CustomerioTrack
from .committer import CommitterStatistics, GroupCommitter
from .cors import CorsPolicy
from .payloads import (
    check_size,
    dedupe_key,
    only_fields,
    opt_object,
    opt_time,
    require_id,
    require_name,
    require_object,
    signup_time,
)
from .sendapi import SendAPI
from .subscriptions import SubscriptionsAPI
from .writes import CommitResult, EventWrite, ForgetWrite, UserWrite, Write

__all__ = ["IngestService", "IngestStatistics"]

log = structlog.get_logger("segflowd.ingest")

FOREVER = 100 * 365 * 86400.0  # seconds: the forget window of `forget_window = "forever"`
BUS_EVENTS_PER_COMMIT = 200  # "event.ingested" bus messages per commit, beyond: one summary


_SUCCESS = b'{"success":true}'  # what Segment's API answers
# The native API's request bodies (openapi.yaml: UserUpdate, Event); anything else is a 400.
_USER_FIELDS = frozenset({"attributes"})
_EVENT_FIELDS = frozenset({"name", "attributes", "timestamp", "id"})


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:g} days" if days >= 1 else f"{seconds / 3600:g} hours"


def _event_reply(event_id: int | None, duplicate: bool) -> Response:
    """``{"id", "duplicate"}``, 202: written out, this is per request on the hot path."""
    number = b"null" if event_id is None else str(int(event_id)).encode()
    return Response(202, b'{"id":%s,"duplicate":%s}'
                    % (number, b"true" if duplicate else b"false"))


@dataclasses.dataclass(frozen=True)
class IngestStatistics:
    requests: int
    rejected: int  # 4xx answers
    unavailable: int  # 503 answers
    committer: CommitterStatistics
    forgotten: int = 0  # 409 answers: writes to a recently forgotten user (in `rejected` too)


class IngestService:
    """Registers the ingest routes and runs the group committer (a daemon Service)."""

    name = "ingest"

    def __init__(self, kernel: Kernel, *, sinks: Sequence[IngestSink] = (),
                 committer: GroupCommitter | None = None,
                 wakers: Sequence[OutboxWaker] = ()) -> None:
        self.kernel = kernel
        http = kernel.config.http
        self.max_event = http.max_event_bytes
        self.max_request = http.max_request_bytes
        self.auth = Authenticator(http.keys)
        self.send = SendAPI(kernel, self.auth, max_request=self.max_request,
                            max_event=self.max_event, wakers=wakers)  # /v1/send/...
        self.forget_window = kernel.config.retention.forget_window
        window = FOREVER if self.forget_window is None else float(self.forget_window)
        self.committer = committer or GroupCommitter(kernel.store, kernel.clock, sinks,
                                                     forget_window=window)
        self.committer.on_commit.append(self._published)
        self._done = anyio.Event()
        self._requests = self._rejected = self._unavailable = self._forgotten = 0
        m = kernel.metrics
        m.describe("segflow_ingest_requests_total", "counter", "ingest requests by API and status")
        m.describe("segflow_ingest_events_total", "counter", "events committed by ingest")
        m.describe("segflow_ingest_flushes_total", "counter", "group commits")
        m.describe("segflow_ingest_forgotten_refused_total", "counter",
                   "requests refused (409) for writing to a recently forgotten user")
        self._request_seconds = m.histogram(
            "segflow_ingest_request_seconds", "ingest request latency by API, in seconds",
            INGEST_BUCKETS)
        self._commit_seconds = m.histogram(
            "segflow_group_commit_seconds",
            "a request's wait for its group commit (queue and flush), in seconds",
            COMMIT_BUCKETS)
        m.collect_process()  # the daemon always runs ingest: its registry gets process_*
        kernel.stats[self.name] = self.statistics

    def statistics(self) -> IngestStatistics:
        return IngestStatistics(self._requests, self._rejected, self._unavailable,
                                self.committer.statistics(), self._forgotten)

    # -- Service ---------------------------------------------------------------------

    def register_routes(self, router: Router) -> None:
        add = router.add
        add("PUT", "/v1/users/{id}", self._counted("native", self.put_user))
        add("GET", "/v1/users/{id}", self._counted("native", self.get_user))
        add("DELETE", "/v1/users/{id}", self._counted("native", self.delete_user))
        add("POST", "/v1/users/{id}/events", self._counted("native", self.post_event))
        subs = SubscriptionsAPI(self.kernel, self.auth)  # a user's topics
        add("GET", "/v1/users/{id}/subscriptions", self._counted("native", subs.get))
        add("PUT", "/v1/users/{id}/subscriptions", self._counted("native", subs.put))
        # Tracking routes (cors.add): browsers may call them, from [http] cors_origins.
        cors = CorsPolicy(self.kernel.config.http.cors_origins)
        router.on_unrouted = unrouted.counter(self.kernel.metrics)
        for route, kind in (*zip(segment_api.TYPES, segment_api.TYPES, strict=True),
                            *segment_api.SHORT_ROUTES.items()):
            cors.add(router, "POST", f"/v1/{route}",
                     self._counted("segment", self._segment_single(kind)))
        for route in segment_api.BATCH_ROUTES:
            cors.add(router, "POST", f"/v1/{route}",
                     self._counted("segment", self.segment_batch))
        cors.add(router, "POST", "/v1/m", self._counted("segment", self.segment_metrics))
        cors.add(router, "PUT", "/api/v1/customers/{id}",
                 self._counted("customerio", self.cio_customer))
        add("DELETE", "/api/v1/customers/{id}", self._counted("customerio", self.cio_delete))
        cors.add(router, "POST", "/api/v1/customers/{id}/events",
                 self._counted("customerio", self.cio_event))
        cors.add(router, "POST", "/api/v1/events",
                 self._counted("customerio", self.cio_anonymous_event))
        # devices, suppress, merge, v2, push: those that only write with CORS too
        CustomerioTrack(self).register_routes(router, cors)
        cors.add_preflights(router)
        add("POST", "/v1/send/email", self._counted("app", self.send.cio_send_email))
        add("POST", "/v1/send/{template}", self._counted("native", self.send.native_send))

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.committer.run)
                tg.start_soon(self.send.forget_data)
                task_status.started()
        finally:
            self._done.set()

    async def drain(self) -> None:
        """Commit what is queued, then stop the committer."""
        await self.committer.close()
        self.send.close()
        await self._done.wait()

    # -- plumbing --------------------------------------------------------------------

    def _counted(self, api: str, handler: Callable[[Request], Awaitable[Response]]
                 ) -> Callable[[Request], Awaitable[Response]]:
        metrics = self.kernel.metrics
        observe = self._request_seconds.bind(api=api)

        async def counted(request: Request) -> Response:
            self._requests += 1
            started = time.perf_counter()
            status = "500"
            try:
                response = await handler(request)
                status = str(response.status)
                return response
            except HTTPError as exc:
                self._rejected += 1
                status = str(exc.status)
                raise
            except IngestError as exc:
                self._rejected += 1
                status = "422"
                raise HTTPError(422, "unprocessable", str(exc)) from None
            except StoreUnavailable:
                self._unavailable += 1
                status = "503"
                raise
            finally:
                metrics.inc("segflow_ingest_requests_total", api=api, status=status)
                observe(time.perf_counter() - started)

        return counted

    async def _commit(self, writes: Sequence[Write], *,
                      batch: Mapping[str, object] | None = None) -> CommitResult:
        """Commit ``writes``; 409 (nothing written) when they go to a forgotten user.

        With ``batch`` (a Segment ``/v1/batch`` body) the message names its items.
        """
        started = time.perf_counter()
        result = await self.committer.submit(writes)
        self._commit_seconds.observe(time.perf_counter() - started)
        if result.refused:
            where = "" if batch is None else segment_api.items_of(batch, result.refused)
            self._forgotten += 1
            self.kernel.metrics.inc("segflow_ingest_forgotten_refused_total")
            names = ", ".join(repr(uid) for uid in result.refused[:5])
            window = ("" if self.forget_window is None
                      else f" within {_days(self.forget_window)} of the forget")
            raise HTTPError(409, "user_forgotten", (
                f"{where}user {names} was forgotten (DELETE){window}: their events and "
                "identifies are refused so the forget holds, and nothing of this request "
                "was stored; PUT /v1/users/{id} creates the user again"))
        return result

    def _published(self, batch: IngestBatch) -> None:
        bus, metrics = self.kernel.bus, self.kernel.metrics
        metrics.inc("segflow_ingest_flushes_total")
        if batch.events:
            metrics.inc("segflow_ingest_events_total", float(len(batch.events)))
        bus.publish_each("event.ingested", (
            {"event_id": e.id, "user_id": e.user_id, "anonymous_id": e.anonymous_id,
             "name": e.name} for e in batch.events[:BUS_EVENTS_PER_COMMIT]))
        if len(batch.events) > BUS_EVENTS_PER_COMMIT:
            bus.publish("ingest.batch", events=len(batch.events), users=len(batch.users))
        for uid in batch.deleted:
            bus.publish("user.deleted", user_id=uid)

    async def _body(self, request: Request, *, any_type: bool = False) -> dict[str, object]:
        return require_object(await request.json(self.max_request, any_type=any_type), "body")

    async def _event_limit(self, request: Request) -> int | None:
        """The per-event limit to check, or None when the whole body is within it."""
        raw = await request.body(self.max_request)  # already read: the cached body
        return self.max_event if len(raw) > self.max_event else None

    async def _segment_body(self, request: Request) -> dict[str, object]:
        """The body of an authenticated Segment request (Basic is checked before reading)."""
        if request.headers.get("authorization"):
            self.auth.segment(request, None)
            return await self._body(request, any_type=True)  # JSON whatever its label
        body = await self._body(request, any_type=True)
        self.auth.segment(request, body.get("writeKey"))
        return body

    # -- native API ------------------------------------------------------------------

    async def put_user(self, request: Request) -> Response:
        self.auth.native(request)
        uid = require_id(request.params["id"], "id")
        body = await self._body(request)
        check_size(body, await self._event_limit(request), "body")
        only_fields(body, _USER_FIELDS, "; a user's email and other attributes go in "
                                        '"attributes"')
        attributes = opt_object(body.get("attributes"), "attributes")
        # An explicit re-create: allowed for a forgotten user, whose tombstone it drops.
        await self._commit([UserWrite(uid, attributes, recreate=True)])
        return json_response({"id": uid, "ok": True})

    async def get_user(self, request: Request) -> Response:
        self.auth.native(request)
        uid = require_id(request.params["id"], "id")
        async with self.kernel.store.connect() as conn:
            view = await users.read_user(conn, uid)
        if view is None:
            raise HTTPError(404, "not_found", f"no user {uid!r}")
        return json_response(view.as_json())

    async def delete_user(self, request: Request) -> Response:
        self.auth.native(request)
        uid = require_id(request.params["id"], "id")
        result = await self._commit([ForgetWrite(uid)])
        log.info("user.forgotten", user_id=uid, existed=result.forgotten[0])
        return json_response({"id": uid, "deleted": result.forgotten[0]})

    async def post_event(self, request: Request) -> Response:
        self.auth.native(request)
        uid = require_id(request.params["id"], "id")
        body = await self._body(request)
        check_size(body, await self._event_limit(request), "body")
        only_fields(body, _EVENT_FIELDS, '; event data goes in "attributes"')
        write = EventWrite(
            name=require_name(body.get("name"), "name"),
            attributes=opt_object(body.get("attributes"), "attributes"),
            created_at=opt_time(body.get("timestamp"), "timestamp"),
            user_id=uid, dedupe_key=dedupe_key("n", uid, body.get("id"), "id"))
        result = await self._commit([write])
        return _event_reply(result.event_ids[0], result.duplicates[0])

    # -- Segment ---------------------------------------------------------------------

    def _segment_single(self, kind: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            received = self.kernel.clock.now()
            body = await self._segment_body(request)
            writes = segment_api.parse_message(body, kind, field="body", received=received,
                                               max_event=await self._event_limit(request))
            await self._commit(writes)
            return Response(200, _SUCCESS)

        return handler

    async def segment_batch(self, request: Request) -> Response:
        received = self.kernel.clock.now()
        body = await self._segment_body(request)
        writes = segment_api.parse_batch(body, max_event=await self._event_limit(request),
                                         received=received)
        if writes:
            # Segment's API answers a batch as a whole: one item for a forgotten user
            # refuses the batch (409 naming the items); the client drops or fixes it.
            await self._commit(writes, batch=body)
        return Response(200, _SUCCESS)

    async def segment_metrics(self, request: Request) -> Response:
        """``/v1/m``: analytics.js's own metrics, read (within the limit) and dropped."""
        await request.body(self.max_request)
        return Response(200, _SUCCESS)

    # -- Customer.io -----------------------------------------------------------------

    async def cio_customer(self, request: Request) -> Response:
        self.auth.customerio(request)
        uid = require_id(request.params["id"], "id")
        body = await self._body(request)
        limit = await self._event_limit(request)
        writes = cio_api.parse_customer(uid, body, max_event=limit)
        if (signup := signup_time(body, "body")) is not None:  # created_at: users.created_at
            writes = [dataclasses.replace(w, created_at=signup)
                      if isinstance(w, UserWrite) else w for w in writes]
        await self._commit(writes)
        return json_response({})

    async def cio_delete(self, request: Request) -> Response:
        self.auth.customerio(request, need="all")  # a forget: never with a public key
        uid = require_id(request.params["id"], "id")
        await self._commit([ForgetWrite(uid)])
        return json_response({})

    async def cio_event(self, request: Request) -> Response:
        self.auth.customerio(request)
        uid = require_id(request.params["id"], "id")
        body = await self._body(request)
        limit = await self._event_limit(request)
        await self._commit(cio_api.parse_event(body, user_id=uid, max_event=limit))
        return json_response({})

    async def cio_anonymous_event(self, request: Request) -> Response:
        self.auth.customerio(request)
        body = await self._body(request)
        limit = await self._event_limit(request)
        await self._commit(cio_api.parse_event(body, user_id=None, max_event=limit))
        return json_response({})
