"""Adversarial review of ``rt.webhook``: hostile receivers, races with the instance's end,
a forget, a lost COMMIT reply, DNS that changes between the check and the connect, and
allow-list patterns that say more than they seem to.

Each test asserts what the contract promises; each failed on the first version, and the
last one fixed was DNS rebinding (segflowd.delivery.pinned). Most drive
the outcall worker by hand
(:meth:`OutcallService.run_once`: claim, call, record) so that a row left behind is seen
at once instead of after a guard expires.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from test_flows import make_app
from test_webhook_step import (
    SECRET,
    SETTLE_GUARD,
    Flow,
    Receiver,
    Reply,
    Rig,
    calling,
)

from segflowd.bus import Bus
from segflowd.clock import SystemClock
from segflowd.config import load_config
from segflowd.delivery import outcallservice
from segflowd.delivery.outcalls import literal_refusal, secret_headers
from segflowd.delivery.outcallservice import OutcallService
from segflowd.errors import StoreUnavailable
from segflowd.flows import webhookwait
from segflowd.flows.service import FlowService
from segflowd.ingest.users import forget
from segflowd.kernel import Kernel
from segflowd.metrics import Metrics
from segflowd.store import Store

pytestmark = pytest.mark.anyio


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


@contextlib.asynccontextmanager
async def by_hand(rig: Rig, app: Any) -> AsyncIterator[OutcallService]:
    """The flow service running, the outcall worker NOT running: the test steps it with
    ``run_once``, so what one round leaves in the store is what the test reads."""
    k = Kernel(config=rig.config, app=app, store=rig.store, clock=SystemClock(),
               bus=Bus(), metrics=Metrics())
    outcalls = OutcallService(k)
    flows = FlowService(k, workers=2, wakers=[outcalls])
    outcalls.on_final = flows.schedule
    rig.kernel, rig.flows, rig.outcalls = k, flows, outcalls
    async with anyio.create_task_group() as tg:
        await tg.start(flows.run)
        yield outcalls
        await flows.drain()
        tg.cancel_scope.cancel()


async def webhook_row(rig: Rig) -> Any:
    (row,) = await rig.rows("webhook")
    return row


# -- a hostile answer leaves the row `sending` and the flow waiting forever --------------

async def test_a_deeply_nested_json_answer_settles_the_call(rig: Rig, receiver: Receiver
                                                            ) -> None:
    receiver.default = Reply(200, b"[" * 5000 + b"]" * 5000)  # 10 kB, under max_body
    async with by_hand(rig, make_app("c", calling(receiver.url()))) as outcalls:
        await rig.start("ann")
        await rig.settled("ann", "waiting")
        assert await outcalls.run_once() == 1
        row = await webhook_row(rig)
    assert len(receiver.calls) == 1
    assert row.status in ("sent", "failed"), "the answered call was never recorded"


async def test_a_retry_after_of_unicode_digits_is_ignored_not_fatal(
        rig: Rig, receiver: Receiver) -> None:
    receiver.default = Reply(503, b"down", (("Retry-After", "\u00b2"),))
    async with by_hand(rig, make_app("c", calling(receiver.url()))) as outcalls:
        await rig.start("ann")
        await rig.settled("ann", "waiting")
        assert await outcalls.run_once() == 1
        row = await webhook_row(rig)
    assert row.status == "queued", f"the retry was not recorded (status {row.status})"


def non_ascii_header(url: str) -> Any:
    def flow(ctx: Any, rt: Any) -> Flow:
        yield rt.webhook(url, headers={"X-Name": "Zo\u00eb"})  # e.g. from user data
    return flow


async def test_a_header_value_http_cannot_carry_fails_the_step(
        rig: Rig, receiver: Receiver) -> None:
    """Refused by rt.webhook itself: the instance fails with why, and no call is queued
    (first version: queued, then httpx could not encode it and the row stayed 'sending')."""
    async with by_hand(rig, make_app("c", non_ascii_header(receiver.url()))) as outcalls:
        await rig.start("ann")
        await rig.settled("ann", "failed")
        assert await outcalls.run_once() == 0
    assert receiver.calls == []


# -- the instance ended while its call was queued -----------------------------------------

async def test_a_terminated_instance_is_not_called_for(rig: Rig, receiver: Receiver) -> None:
    async with by_hand(rig, make_app("c", calling(receiver.url()))) as outcalls:
        iid = await rig.start("ann")
        await rig.settled("ann", "waiting")
        assert rig.kernel is not None
        await rig.kernel.actions["instance.terminate"]({"instance": iid})
        await outcalls.run_once()
    assert receiver.calls == []


# -- a forget while the call is in flight -----------------------------------------------

async def test_an_answer_that_comes_after_a_forget_is_not_stored(
        rig: Rig, receiver: Receiver) -> None:
    hold = anyio.Event()
    receiver.replies = [Reply(200, b'{"email": "ann@example.com"}', hold=hold)]
    async with rig.running(make_app("c", calling(receiver.url()))) as k:
        await rig.start("ann")
        with anyio.fail_after(SETTLE_GUARD):
            await receiver.got_call.wait()
        async with rig.store.begin() as conn:
            await forget(conn, "ann", k.clock.now())
        hold.set()
        with anyio.fail_after(SETTLE_GUARD):
            while True:
                row = await webhook_row(rig)
                if row.status != "sending":
                    break
                await anyio.sleep(0.02)
    assert row.user_id is None  # what forget() cleared
    assert row.data is None
    assert row.response is None, f"stored after the forget: {row.response}"


# -- a COMMIT reported failed but applied -----------------------------------------------

async def test_a_lost_reply_on_the_outcome_commit_still_resumes_the_flow(
        rig: Rig, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    armed: list[int] = []
    outcome_conn: list[Any] = []  # the connection that recorded the first outcome
    real_record = webhookwait.record_outcome

    async def record_outcome(conn: Any, **kwargs: Any) -> bool:
        woke = await real_record(conn, **kwargs)
        if not armed:
            armed.append(1)
            outcome_conn.append(conn)
        return bool(woke)

    monkeypatch.setattr(outcallservice, "record_outcome", record_outcome)
    real_begin = rig.store.begin

    @contextlib.asynccontextmanager
    async def begin() -> AsyncIterator[Any]:
        async with real_begin() as conn:
            yield conn
        # committed; the worker hears otherwise, as Store.begin would tell it
        if armed == [1] and outcome_conn[0] is conn:
            armed.append(2)
            raise StoreUnavailable("store unavailable: (2013, 'Lost connection to server "
                                   "during query')")

    monkeypatch.setattr(rig.store, "begin", begin)
    async with rig.running(make_app("c", calling(receiver.url()))):
        await rig.start("ann")
        with anyio.move_on_after(15):  # a guard only: stuck, it never settles
            inst = await rig.settled("ann", "completed", "failed")
        inst = await rig.instance("ann")
    assert armed == [1, 2]
    assert inst.status == "completed", f"still {inst.status}: the flow was never resumed"


# -- DNS that answers differently at the check and at the connect ----------------------

async def test_a_name_that_rebinds_to_loopback_after_the_check_is_not_called(
        rig: Rig, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    host = "hook.rebind.test"
    rig.configure(allow=f'["http://*.rebind.test:{receiver.port}/*"]')
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(name: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        text = name.decode() if isinstance(name, bytes) else str(name)
        if text != host:
            return real(name, port, *args, **kwargs)
        asked.append(text)  # a public address first (the check), loopback after (TTL 0)
        address = "93.184.216.34" if len(asked) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    url = f"http://{host}:{receiver.port}/hook"
    async with by_hand(rig, make_app("c", calling(url))) as outcalls:
        await rig.start("ann")
        await rig.settled("ann", "waiting")
        await outcalls.run_once()
    assert asked, "the test's resolver was not consulted"
    assert receiver.calls == [], "a loopback receiver was reached past the allow-list"
    row = await webhook_row(rig)
    assert row.status == "failed"
    assert "127.0.0.1" in str(row.last_error)


# -- patterns: `*` spans '/', so a host wildcard also matches other hosts' paths ----------

def test_a_subdomain_pattern_does_not_match_another_host(tmp_path: Path) -> None:
    cfg_file = tmp_path / "segflow.toml"
    cfg_file.write_text(
        '[daemon]\napp = "app.py:app"\n[email]\nprovider = "outbox"\n'
        '[providers.outbox]\nplugin = "outbox"\n'
        '[webhooks]\nallow = ["https://*.partner.test/*"]\n'
        f'[webhooks.headers."https://*.partner.test/*"]\nAuthorization = "{SECRET}"\n')
    cfg = load_config(cfg_file, environ={}).webhooks
    assert literal_refusal("https://api.partner.test/x", cfg) is None  # meant to pass
    for url in ("https://attacker.example/.partner.test/",
                "https://attacker.example?.partner.test/",
                "https://attacker.example#.partner.test/"):
        assert secret_headers(url, cfg) == {}, f"the secret goes to {url}"
        assert literal_refusal(url, cfg) is not None, f"{url} is allowed"


async def test_the_rig_still_answers(rig: Rig, receiver: Receiver) -> None:
    """Control: the by-hand worker records an ordinary answer (so the xfails above fail
    for their bug, not for the harness)."""
    async with by_hand(rig, make_app("c", calling(receiver.url()))) as outcalls:
        await rig.start("ann")
        await rig.settled("ann", "waiting")
        assert await outcalls.run_once() == 1
        row = await webhook_row(rig)
        inst = await rig.settled("ann")
    assert row.status == "sent"
    assert inst.status == "completed", inst.error
    async with rig.store.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(
            sa.table("messages")))).scalar() == 2  # the call and the email after it
