"""``rt.webhook``: a durable outbound call, against a real HTTP receiver on 127.0.0.1.

The flow service and the outcall worker run on a real store with the system clock (the
calls are real network I/O); each test waits for the instance to settle, bounded by a
generous guard that only stops a hung test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from anyio.abc import SocketStream, TaskStatus
from test_flows import make_app

from segflowd import WebhookFailed
from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.cli.flowscan import scan_app
from segflowd.cli.webhookcheck import webhook_problems
from segflowd.clock import SystemClock
from segflowd.config import load_config
from segflowd.delivery.outcallservice import OutcallService
from segflowd.errors import FlowError
from segflowd.flows.service import FlowService
from segflowd.hooks import IngestBatch, MembershipChange, StoredEvent
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.schema import events, flow_instances, flow_journal, messages, segment_members, users
from segflowd.store import Store

pytestmark = pytest.mark.anyio

SETTLE_GUARD = 60.0  # seconds: only a hung test ever reaches it
SECRET = "s3cret-token-value"
DRAIN_LIMIT = 1.0  # seconds the worker may take to finish its calls at a stop


@dataclasses.dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    hold: anyio.Event | None = None  # the answer waits until this is set


@dataclasses.dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A minimal HTTP/1.1 server: records each request, answers from ``replies`` in order
    (then ``default``), one request per connection."""

    def __init__(self) -> None:
        self.calls: list[Received] = []
        self.replies: list[Reply] = []
        self.default = Reply()
        self.port = 0
        self.got_call = anyio.Event()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        async with listener:
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            data = b""
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:])}
                while len(body) < int(headers.get("content-length", "0")):
                    body += await stream.receive()
                self.calls.append(Received(method, path, headers, body))
                self.got_call.set()
                reply = self.replies.pop(0) if self.replies else self.default
                if reply.hold is not None:
                    await reply.hold.wait()
                extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers)
                await stream.send(
                    f"HTTP/1.1 {reply.status} X\r\nContent-Length: {len(reply.body)}\r\n"
                    f"Connection: close\r\n{extra}\r\n".encode() + reply.body)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class Rig:
    """The flow service and the outcall worker on one store, with a receiver."""

    def __init__(self, store: Store, tmp_path: Path, receiver: Receiver) -> None:
        self.store = store
        self.tmp_path = tmp_path
        self.receiver = receiver
        self.flows: FlowService | None = None
        self.outcalls: OutcallService | None = None
        self.kernel: Kernel | None = None
        self.configure()

    def configure(self, allow: str | None = None, **webhooks: object) -> None:
        allow = allow or f'["http://127.0.0.1:{self.receiver.port}/hook*"]'
        opts = {"max_attempts": 3, "retry_base": 0.05, "retry_max": 0.2, **webhooks}
        cfg = self.tmp_path / "segflow.toml"
        cfg.write_text(
            '[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
            '[providers.outbox]\nplugin = "outbox"\n'
            f"[webhooks]\nallow = {allow}\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in opts.items())
            + f'[webhooks.headers."http://127.0.0.1:{self.receiver.port}/*"]\n'
            f'X-Secret = "{SECRET}"\n')
        self.config = load_config(cfg, environ={})

    @contextlib.asynccontextmanager
    async def running(self, app: Segflow) -> AsyncIterator[Kernel]:
        k = Kernel(config=self.config, app=app, store=self.store, clock=SystemClock(),
                   bus=Bus(), metrics=Metrics())
        outcalls = OutcallService(k)
        flows = FlowService(k, workers=2, wakers=[outcalls])
        outcalls.on_final = flows.schedule
        self.kernel, self.flows, self.outcalls = k, flows, outcalls
        async with anyio.create_task_group() as tg:
            await tg.start(flows.run)
            await tg.start(outcalls.run)
            yield k
            # as the daemon stops: drained (bounded: a call the receiver holds is cut)
            with anyio.move_on_after(DRAIN_LIMIT):
                await outcalls.drain()
            await flows.drain()
            tg.cancel_scope.cancel()

    async def start(self, uid: str) -> int:
        """``uid`` joins the campaign's segment; the instance's id."""
        k = self.kernel
        assert k is not None
        assert self.flows is not None
        now = k.clock.now()
        async with self.store.begin() as conn:
            await conn.execute(sa.insert(users).values(
                id=uid, email=f"{uid}@example.com", attributes={}, created_at=now,
                updated_at=now))
            await conn.execute(sa.insert(segment_members).values(
                segment="seg", user_id=uid, entered_at=now, evaluated_at=now))
        await self.flows.membership_changed([MembershipChange("seg", uid, True, now)])
        inst = await self.instance(uid)
        return int(inst.id)

    async def instance(self, uid: str) -> Any:
        async with self.store.connect() as conn:
            return (await conn.execute(sa.select(flow_instances).where(
                flow_instances.c.user_id == uid).order_by(flow_instances.c.id.desc()))).first()

    async def settled(self, uid: str, *statuses: str, wait_event: str | None = None) -> Any:
        """The user's instance once its status is one of ``statuses`` (and it waits for
        ``wait_event``, when given)."""
        statuses = statuses or ("completed", "failed")
        with anyio.fail_after(SETTLE_GUARD):
            while True:
                inst = await self.instance(uid)
                if inst is not None and inst.status in statuses and (
                        wait_event is None or inst.wait_event == wait_event):
                    return inst
                await anyio.sleep(0.02)

    async def rows(self, channel: str) -> list[Any]:
        async with self.store.connect() as conn:
            return list(await conn.execute(sa.select(messages).where(
                messages.c.channel == channel).order_by(messages.c.id)))

    async def event(self, uid: str, name: str) -> None:
        assert self.kernel is not None
        assert self.flows is not None
        now = self.kernel.clock.now()
        async with self.store.begin() as conn:
            res = await conn.execute(sa.insert(events).values(
                user_id=uid, name=name, attributes={}, created_at=now, received_at=now))
            eid = int(res.inserted_primary_key[0])  # type: ignore[index]
        self.flows.ingested(IngestBatch(users=frozenset({uid}), events=(
            StoredEvent(eid, uid, None, name, {}, now, now),)))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    async with anyio.create_task_group() as tg:
        await tg.start(r.serve)
        yield r
        tg.cancel_scope.cancel()


@pytest.fixture
def rig(store: Store, tmp_path: Path, receiver: Receiver) -> Rig:
    return Rig(store, tmp_path, receiver)


Flow = Generator[object, Any, None]


def calling(url: str, **kw: object) -> Any:
    def flow(ctx: Any, rt: Any) -> Flow:
        r = yield rt.webhook(url, json={"user": ctx.user_id}, headers={"X-Flow": "1"}, **kw)
        yield rt.send_email("after", status=r.status, json=r.json, reply=r.headers.get("x-reply"),
                            truncated=r.truncated)
    return flow


async def after_data(rig: Rig) -> dict[str, Any]:
    (row,) = await rig.rows("email")
    assert row.template == "after"
    return dict(row.data)


# -- the call and its answer ------------------------------------------------------------

async def test_the_flow_sees_status_json_and_headers_and_the_call_carries_the_step_key(
        rig: Rig, receiver: Receiver) -> None:
    receiver.default = Reply(201, b'{"id": 7}', (("Content-Type", "application/json"),
                                                ("X-Reply", "yes")))
    async with rig.running(make_app("c", calling(receiver.url()))):
        iid = await rig.start("ann")
        inst = await rig.settled("ann")
    assert inst.status == "completed", inst.error
    assert await after_data(rig) == {"status": 201, "json": {"id": 7}, "reply": "yes",
                                     "truncated": False}
    (call,) = receiver.calls
    assert call.method == "POST"
    assert call.headers["idempotency-key"] == f"flow:{iid}:0"
    assert call.headers["x-secret"] == SECRET  # from config
    assert call.headers["x-flow"] == "1"  # from the flow
    assert json.loads(call.body) == {"user": "ann"}
    (hook,) = await rig.rows("webhook")
    assert (hook.status, hook.dedupe_key, hook.attempts) == ("sent", f"flow:{iid}:0", 1)
    assert hook.response["status"] == 201
    assert hook.response["json"] == {"id": 7}
    async with rig.store.connect() as conn:
        journal = [dict(r._mapping) for r in await conn.execute(sa.select(flow_journal))]
    stored = json.dumps([dict(hook._mapping), journal], default=str)
    assert SECRET not in stored  # secret headers are never stored


async def test_a_4xx_is_an_answer_the_flow_sees_not_a_retry(rig: Rig, receiver: Receiver
                                                             ) -> None:
    receiver.default = Reply(404, b"not here", ())
    async with rig.running(make_app("c", calling(receiver.url()))):
        await rig.start("ann")
        inst = await rig.settled("ann")
    assert inst.status == "completed", inst.error
    assert await after_data(rig) == {"status": 404, "json": None, "reply": None,
                                     "truncated": False}
    assert len(receiver.calls) == 1


async def test_500_and_429_are_retried_with_the_same_idempotency_key(
        rig: Rig, receiver: Receiver) -> None:
    receiver.replies = [Reply(500, b"boom", ()),
                        Reply(429, b"slow down", (("Retry-After", "0"),))]
    async with rig.running(make_app("c", calling(receiver.url()))):
        iid = await rig.start("ann")
        inst = await rig.settled("ann")
    assert inst.status == "completed", inst.error
    assert [c.headers["idempotency-key"] for c in receiver.calls] == [f"flow:{iid}:0"] * 3
    assert (await after_data(rig))["status"] == 200
    (hook,) = await rig.rows("webhook")
    assert (hook.status, hook.attempts) == ("sent", 3)


def catching(url: str) -> Any:
    def flow(ctx: Any, rt: Any) -> Flow:
        try:
            yield rt.webhook(url)
        except WebhookFailed as exc:
            yield rt.send_email("fallback", error=str(exc))
    return flow


async def test_webhook_failed_after_the_last_attempt_can_be_caught(
        rig: Rig, receiver: Receiver) -> None:
    receiver.default = Reply(503, b"down", ())
    async with rig.running(make_app("c", catching(receiver.url()))):
        await rig.start("ann")
        inst = await rig.settled("ann")
    assert inst.status == "completed", inst.error
    (row,) = await rig.rows("email")
    assert row.template == "fallback"
    assert "failed after 3 attempts" in row.data["error"]
    assert "HTTP 503" in row.data["error"]
    assert len(receiver.calls) == 3
    (hook,) = await rig.rows("webhook")
    assert hook.status == "failed"


async def test_uncaught_webhook_failed_fails_the_instance_with_the_error(
        rig: Rig, receiver: Receiver) -> None:
    receiver.default = Reply(500, b"boom", ())
    async with rig.running(make_app("c", calling(receiver.url()))):
        await rig.start("ann")
        inst = await rig.settled("ann")
    assert inst.status == "failed"
    assert "failed after 3 attempts" in inst.error
    assert "HTTP 500" in inst.error
    assert await rig.rows("email") == []


async def test_a_connection_refused_is_retried_then_fails(rig: Rig, receiver: Receiver
                                                          ) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
    await listener.aclose()  # a port nothing listens on
    rig.configure(allow=f'["http://127.0.0.1:{port}/*"]')
    async with rig.running(make_app("c", calling(f"http://127.0.0.1:{port}/hook"))):
        await rig.start("ann")
        inst = await rig.settled("ann")
    assert inst.status == "failed"
    assert "failed after 3 attempts" in inst.error


# -- the allow-list ---------------------------------------------------------------------

async def test_an_unlisted_url_is_refused_without_a_call_or_a_retry(
        rig: Rig, receiver: Receiver) -> None:
    async with rig.running(make_app("c", calling(receiver.url("/elsewhere")))):
        await rig.start("ann")
        inst = await rig.settled("ann")
    assert inst.status == "failed"
    assert "not in [webhooks] allow" in inst.error
    assert receiver.calls == []
    (hook,) = await rig.rows("webhook")
    assert (hook.status, hook.attempts) == ("failed", 1)


async def test_loopback_is_refused_unless_its_host_is_listed_explicitly(
        rig: Rig, receiver: Receiver) -> None:
    rig.configure(allow='["http://*"]')
    async with rig.running(make_app("c", calling(receiver.url()))):
        await rig.start("ann")
        inst = await rig.settled("ann")
    assert inst.status == "failed"
    assert "loopback" in inst.error
    assert receiver.calls == []


# -- limits, replay, early wakes and interruptions --------------------------------------

async def test_a_body_over_max_body_reaches_the_flow_as_truncated(
        rig: Rig, receiver: Receiver) -> None:
    rig.configure(max_body=64)
    receiver.default = Reply(200, json.dumps({"pad": "x" * 1000}).encode())
    async with rig.running(make_app("c", calling(receiver.url()))):
        await rig.start("ann")
        inst = await rig.settled("ann")
    assert inst.status == "completed", inst.error
    data = await after_data(rig)
    assert (data["status"], data["json"], data["truncated"]) == (200, None, True)


def calling_then_waiting(url: str) -> Any:
    def flow(ctx: Any, rt: Any) -> Flow:
        r = yield rt.webhook(url)
        yield rt.wait_for_event("go")
        yield rt.send_email("after", status=r.status, json=r.json)
    return flow


async def test_a_replay_after_a_restart_reads_the_journal_and_never_calls_again(
        rig: Rig, receiver: Receiver) -> None:
    receiver.default = Reply(200, b'{"n": 1}')
    app = make_app("c", calling_then_waiting(receiver.url()))
    async with rig.running(app):
        await rig.start("ann")
        await rig.settled("ann", "waiting")
        await rig.settled("ann", "waiting", wait_event="go")
    async with rig.running(app):  # a new process: the flow is replayed from its journal
        await rig.event("ann", "go")
        inst = await rig.settled("ann")
    assert inst.status == "completed", inst.error
    assert await after_data(rig) == {"status": 200, "json": {"n": 1}}
    assert len(receiver.calls) == 1


async def test_an_early_wake_or_a_look_alike_event_does_not_end_the_wait(
        rig: Rig, receiver: Receiver) -> None:
    hold = anyio.Event()
    receiver.replies = [Reply(200, b'{"late": true}', hold=hold)]
    async with rig.running(make_app("c", calling(receiver.url()))) as k:
        iid = await rig.start("ann")
        with anyio.fail_after(SETTLE_GUARD):
            await receiver.got_call.wait()
        with pytest.raises(FlowError, match="no timer"):
            await k.actions["instance.wake"]({"instance": iid})
        # any string is an event name: one spelled like the wait's marker wakes nothing
        marker = (await rig.instance("ann")).wait_event
        assert rig.flows is not None
        rig.flows.awaited.add(marker)  # as after a restart: every stored wait_event is
        await rig.event("ann", marker)
        await rig.flows.settle()
        assert (await rig.instance("ann")).status == "waiting"
        hold.set()
        inst = await rig.settled("ann")
    assert inst.status == "completed", inst.error
    assert (await after_data(rig))["json"] == {"late": True}


async def test_a_call_cut_short_is_made_again_with_the_same_key_and_the_flow_runs_once(
        rig: Rig, receiver: Receiver) -> None:
    """The worker stops while the receiver holds the request; the next start calls again."""
    receiver.replies = [Reply(200, b"{}", hold=anyio.Event())]  # never answered
    app = make_app("c", calling(receiver.url()))
    async with rig.running(app):
        iid = await rig.start("ann")
        with anyio.fail_after(SETTLE_GUARD):
            await receiver.got_call.wait()
    (hook,) = await rig.rows("webhook")
    assert hook.status == "queued"  # given back, not lost and not failed
    async with rig.running(app):
        inst = await rig.settled("ann")
    assert inst.status == "completed", inst.error
    keys = [c.headers["idempotency-key"] for c in receiver.calls]
    assert keys == [f"flow:{iid}:0", f"flow:{iid}:0"]
    assert len(await rig.rows("email")) == 1


async def test_a_row_left_sending_by_a_dead_process_is_queued_again(
        rig: Rig, receiver: Receiver) -> None:
    app = make_app("c", calling(receiver.url()))
    hold = anyio.Event()
    receiver.replies = [Reply(200, b"{}", hold=hold)]
    async with rig.running(app):
        iid = await rig.start("ann")
        with anyio.fail_after(SETTLE_GUARD):
            await receiver.got_call.wait()
        async with rig.store.connect() as conn:
            (status,) = (await conn.execute(sa.select(messages.c.status).where(
                messages.c.channel == "webhook"))).one()
        assert status == "sending"
        assert rig.outcalls is not None
        assert await rig.outcalls.recover() == 1  # what the next start does with it
        rig.outcalls.wake()
        inst = await rig.settled("ann")  # the repeat was answered
        hold.set()  # the first call's answer comes for a claim no longer its own
    assert inst.status == "completed", inst.error
    assert [c.headers["idempotency-key"] for c in receiver.calls] == [f"flow:{iid}:0"] * 2
    (hook,) = await rig.rows("webhook")
    assert (hook.status, hook.attempts) == ("sent", 2)
    assert len(await rig.rows("email")) == 1


# -- segflowd check ----------------------------------------------------------------------

def literal_internal(ctx: Any, rt: Any) -> Flow:
    yield rt.webhook("http://10.0.0.5/hook")


def literal_allowed(ctx: Any, rt: Any) -> Flow:
    yield rt.webhook("http://127.0.0.1:9/hook/x")


async def test_check_refuses_a_literal_url_the_allow_list_refuses_with_file_and_line(
        rig: Rig) -> None:
    rig.configure(allow='["http://*", "http://127.0.0.1:9/hook/*"]')
    app = make_app("bad", literal_internal)
    problems = webhook_problems(rig.config, scan_app(app))
    (problem,) = problems
    assert f"{Path(__file__)}:" in problem
    assert "10.0.0.5" in problem
    assert webhook_problems(rig.config, scan_app(make_app("ok", literal_allowed))) == []
