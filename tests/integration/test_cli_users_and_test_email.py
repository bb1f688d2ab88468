"""``segflowd test-email`` exit codes against a real delivery service, and ``segflowd users
show`` against a daemon whose store holds a user's journey."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from control_harness import T0, make_config, running_daemon, seed, short_tmp

from segflowd import schema
from segflowd.app import Segflow
from segflowd.cli.commands import main
from segflowd.config import Config
from segflowd.control.service import ControlService
from segflowd.daemon import Daemon
from segflowd.delivery.service import DeliveryService
from segflowd.providers import OutgoingMessage, SendResult
from segflowd.store import Store

pytestmark = pytest.mark.anyio


@pytest.fixture
def folder() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


async def cli(*argv: str) -> int:
    return await anyio.to_thread.run_sync(main, list(argv))


class Provider:
    """Answers every message with ``result``; keeps what it was handed."""

    max_batch = 100

    def __init__(self, result: SendResult) -> None:
        self.result = result
        self.sent: list[OutgoingMessage] = []

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.sent.extend(batch)
        return [self.result for _ in batch]

    async def aclose(self) -> None:
        return None


@contextlib.asynccontextmanager
async def mailing_daemon(folder: Path, config: Config, provider: Provider
                         ) -> AsyncIterator[None]:
    (folder / "hi.html").write_text("<p>Hello {{ user.name }}, code {{ code }}</p>")
    app = Segflow(templates=str(folder))
    app.template("hi", subject="Hi", html="hi.html")
    daemon = Daemon(config, app, services=[])
    daemon.services = [ControlService(daemon.kernel),  # type: ignore[list-item]
                       DeliveryService(daemon.kernel,
                                       providers={"outbox": provider})]  # type: ignore[dict-item]
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(30):
            while not daemon.statistics().ready:  # noqa: ASYNC110 - no ready event
                await anyio.sleep(0.01)
        try:
            yield
        finally:
            daemon.request_stop()


async def test_test_email_exits_0_when_sent_and_passes_data(
        sqlite_url: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(folder, sqlite_url)
    provider = Provider(SendResult(ok=True, provider_message_id="p1"))
    async with mailing_daemon(folder, config, provider):
        capsys.readouterr()
        code = await cli("test-email", "hi", "qa@example.org", "--data", '{"code": 42}',
                         "--socket", str(config.daemon.control_socket))
        out = capsys.readouterr().out
    assert code == 0
    assert out.strip().endswith("sent")
    assert b"code 42" in provider.sent[0].mime


async def test_test_email_exits_1_with_the_reason_when_the_send_failed(
        sqlite_url: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(folder, sqlite_url)
    provider = Provider(SendResult(ok=False, error="smtp 535 authentication failed"))
    async with mailing_daemon(folder, config, provider):
        capsys.readouterr()
        refused = await cli("test-email", "hi", "qa@example.org", "--data", '{"code": 1}',
                            "--socket", str(config.daemon.control_socket))
        assert capsys.readouterr().err == ("segflowd: the test message was failed: "
                                           "smtp 535 authentication failed\n")
        code = await cli("test-email", "hi", "qa@example.org", "--json", "--data", "{}",
                         "--socket", str(config.daemon.control_socket))
        captured = capsys.readouterr()
    assert (refused, code) == (1, 1)
    reply = json.loads(captured.out[captured.out.index("{\n"):])  # after the daemon's log
    assert (reply["status"], reply["error"]) == ("failed", "template 'hi': 'code' is undefined")
    assert captured.err == ("segflowd: the test message was failed: "
                            "template 'hi': 'code' is undefined\n")


async def test_test_email_exits_3_when_the_provider_may_have_sent_it(
        sqlite_url: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(folder, sqlite_url)
    provider = Provider(SendResult(ok=False, error="timed out", maybe_sent=True))
    async with mailing_daemon(folder, config, provider):
        code = await cli("test-email", "hi", "qa@example.org", "--data", '{"code": 1}',
                         "--socket", str(config.daemon.control_socket))
    assert code == 3
    assert "unknown (not known to be sent): timed out" in capsys.readouterr().err


@pytest.mark.parametrize("data", ["[1]", "{nope"])
def test_test_email_refuses_data_that_is_not_a_json_object(
        folder: Path, data: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["test-email", "hi", "qa@example.org", "--data", data,
                 "--socket", str(folder / "none.sock")])
    assert code == 2
    assert capsys.readouterr().err.startswith("segflowd: --data ")


async def add_journey(store: Store) -> None:
    """u1 (seeded) left 'vip', re-entered it, opened and clicked message 1."""
    at = T0 + dt.timedelta(minutes=30)
    async with store.begin() as conn:
        await conn.execute(sa.insert(schema.segment_changes), [
            {"segment": "vip", "user_id": "u1", "entered": True, "at": T0},
            {"segment": "vip", "user_id": "u1", "entered": False, "at": at},
            {"segment": "vip", "user_id": "u1", "entered": True,
             "at": at + dt.timedelta(hours=1)},
        ])
        await conn.execute(sa.insert(schema.engagement), [
            {"message_id": 1, "user_id": "u1", "kind": "open", "url": None, "hits": 2,
             "machine": False, "created_at": at + dt.timedelta(minutes=5),
             "last_at": at + dt.timedelta(minutes=6)},
            {"message_id": 1, "user_id": "u1", "kind": "click", "url": "https://x.test/a",
             "hits": 1, "machine": False, "created_at": at + dt.timedelta(minutes=7),
             "last_at": at + dt.timedelta(minutes=7)},
        ])


async def test_users_show_prints_the_journey_in_time_order(
        store: Store, store_url: str, folder: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    await seed(store)
    await add_journey(store)
    config = make_config(folder, store_url)
    sock = str(config.daemon.control_socket)
    async with running_daemon(config):
        capsys.readouterr()
        human = await cli("users", "show", "u1", "--socket", sock)
        text = capsys.readouterr().out
        as_json = await cli("users", "show", "u1", "--socket", sock, "--json")
        data = json.loads(capsys.readouterr().out)
        missing = await cli("users", "show", "nobody", "--socket", sock)
        err = capsys.readouterr().err
    assert (human, as_json, missing) == (0, 0, 1)
    assert "email:      ann@example.com" in text
    assert '"plan": "pro"' in text
    journey = text.split("journey (oldest first):\n")[1].splitlines()
    order = [
        "entered segment vip",
        "campaign welcome #1 started (version v1)",
        "campaign welcome #1 step 0: send_email welcome_1",
        "message 1 welcome_1 (welcome) to ann@example.com: sent",
        "campaign welcome #1 step 1: wait 2d",
        "left segment vip",
        "opened message 1 (2 hits)",
        "clicked message 1 https://x.test/a (1 hits)",
        "entered segment vip",
    ]
    positions: list[int] = []
    for want in order:  # each after the one before
        start = positions[-1] + 1 if positions else 0
        positions.append(next(i for i in range(start, len(journey)) if want in journey[i]))
    assert positions == sorted(positions)
    assert data["messages"][0]["to"] == "ann@example.com"
    assert [c["entered"] for c in data["segment_changes"]] == [True, False, True]
    assert "no user with id 'nobody'" in err
