"""The control socket against a running daemon (in-process) on a real store."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from control_harness import T0, make_config, running_daemon, seed, short_tmp, socket_mode

from segflowd.control.client import ControlClient
from segflowd.control.service import ControlService, open_control_socket
from segflowd.errors import ControlReplyError, ControlSocketError, ControlUnavailable
from segflowd.store import Store
from segflowd.testing import FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture
def folder() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


async def raw(path: Path, *lines: bytes) -> list[dict[str, object]]:
    """Send raw request lines on one connection; return the hello and each reply."""
    async with await anyio.connect_unix(path) as s:
        buf = b""
        out: list[dict[str, object]] = []
        for line in (b"", *lines):
            if line:
                await s.send(line)
            while b"\n" not in buf:
                buf += await s.receive()
            first, buf = buf.split(b"\n", 1)
            out.append(json.loads(first))
        return out


# -- snapshots ---------------------------------------------------------------------------

async def test_status_reports_version_uptime_store_health_and_area_statistics(
        store: Store, folder: Path) -> None:
    config = make_config(folder, store.url)
    async with running_daemon(config) as d:
        d.kernel.stats["wheel"] = lambda: {"timers": 7, "lateness_p99_s": 0.25}
        async with await ControlClient.connect(config.daemon.control_socket) as c:
            st = await c.request("status")
    assert isinstance(st, dict)
    assert st["version"] == c.version
    assert st["protocol"] == 1
    assert isinstance(st["uptime_s"], float)
    assert st["uptime_s"] >= 0
    store_st = st["store"]
    assert isinstance(store_st, dict)
    assert store_st["healthy"] is True
    assert store_st["dialect"] in ("sqlite", "mysql", "mariadb")
    assert st["wheel"] == {"size": 7, "lateness_s": 0.25}
    stats = st["stats"]
    assert isinstance(stats, dict)
    assert stats["control"]["connections"] == 1
    assert st["app"] == {"segments": 2, "campaigns": 1, "templates": 0, "transactions": 0}


async def test_status_rates_outbox_and_history_are_sampled_on_the_daemons_clock(
        sqlite_url: str, folder: Path) -> None:
    store = Store.open(sqlite_url)
    await store.migrate()
    await seed(store)
    await store.close()
    clock = FakeClock()
    config = make_config(folder, sqlite_url)
    async with running_daemon(config, clock=clock) as d, \
            await ControlClient.connect(config.daemon.control_socket) as c:
        for i in range(30):
            d.kernel.bus.publish("message.sent", message_id=i)
        for i in range(12):
            d.kernel.bus.publish("event.ingested", event_id=i)
        d.kernel.bus.publish("message.failed", message_id=99)
        await clock.advance(1.0)  # the sampler wakes once, one second of fake time later
        with anyio.fail_after(10):
            while not (st := await c.request("status"))["history"]:  # type: ignore[index]  # noqa: ASYNC110 - polling the daemon itself
                await anyio.sleep(0.02)
    assert isinstance(st, dict)
    assert st["rates"] == {"ingest_per_s": 12.0, "sent_per_s": 30.0, "failed_per_s": 1.0}
    assert st["outbox"] == {"queued": 1, "claimed": 0, "sending": 0}
    assert st["history"] == [{"ingest_per_s": 12.0, "sent_per_s": 30.0, "failed_per_s": 1.0,
                              "outbox": 1, "lateness_s": 0.0}]
    assert st["uptime_s"] == 1.0


async def test_campaigns_count_instances_per_status_and_funnel_per_step(
        store: Store, folder: Path) -> None:
    await seed(store)
    config = make_config(folder, store.url)
    async with running_daemon(config), \
            await ControlClient.connect(config.daemon.control_socket) as c:
        rows = await c.request("campaigns")
        detail = await c.request("campaign", name="welcome")
    assert isinstance(rows, list)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"welcome", "winback"}
    welcome = by_name["welcome"]
    assert welcome["defined"] is True
    assert welcome["version"]
    assert welcome["instances"]["waiting"] == 2
    assert welcome["instances"]["completed"] == 1
    assert (welcome["total"], welcome["live"], welcome["live_versions"]) == (3, 2, {"v1": 2})
    assert welcome["paused"] is True
    assert by_name["winback"]["paused"] is False
    assert by_name["winback"]["defined"] is False
    assert by_name["winback"]["instances"]["failed"] == 1
    assert isinstance(detail, dict)
    funnel = [(f["seq"], f["kind"], f["name"], f["reached"], f["here"])
              for f in detail["funnel"]]
    assert funnel == [(0, "send_email", "welcome_1", 3, 1), (1, "wait", "2d", 2, 1),
                      (2, "send_email", "welcome_2", 1, 0)]


async def test_segments_report_size_and_last_and_next_refresh(store: Store, folder: Path) -> None:
    await seed(store)
    config = make_config(folder, store.url)
    async with running_daemon(config), \
            await ControlClient.connect(config.daemon.control_socket) as c:
        rows = await c.request("segments")
    assert isinstance(rows, list)
    active, vip = rows
    assert (active["name"], active["size"], active["refresh_s"]) == ("active", 3, 3600.0)
    assert active["last_refresh_at"] == T0.isoformat() + "Z"
    assert active["next_refresh_at"] == "2026-03-01T10:00:00Z"
    assert (vip["name"], vip["size"], vip["last_refresh_at"]) == ("vip", 1, None)


async def test_user_shows_attributes_segments_journey_timeline_and_messages(
        store: Store, folder: Path) -> None:
    await seed(store)
    config = make_config(folder, store.url)
    async with running_daemon(config), \
            await ControlClient.connect(config.daemon.control_socket) as c:
        user = await c.request("user", id="u2")
        with pytest.raises(ControlReplyError) as missing:
            await c.request("user", id="nobody")
    assert isinstance(user, dict)
    assert user["attributes"] == {"plan": "free"}
    assert user["email"] == "bob@example.com"
    assert [s["name"] for s in user["segments"]] == ["active"]
    by_campaign = {i["campaign"]: i for i in user["instances"]}
    assert by_campaign["welcome"]["status"] == "waiting"
    assert [j["name"] for j in by_campaign["welcome"]["journal"]] == ["welcome_1"]
    assert by_campaign["winback"]["error"] == "boom: KeyError 'plan'"
    assert [(m["template"], m["status"]) for m in user["messages"]] == [("welcome_1", "failed")]
    assert missing.value.code == "not_found"


async def test_messages_list_recent_first_and_failures_alone(store: Store, folder: Path) -> None:
    await seed(store)
    config = make_config(folder, store.url)
    async with running_daemon(config), \
            await ControlClient.connect(config.daemon.control_socket) as c:
        recent = await c.request("messages", limit=10)
        failures = await c.request("messages", failures=True)
        status = await c.request("status")
    assert isinstance(recent, list)
    assert isinstance(failures, list)
    assert [m["id"] for m in recent] == [3, 2, 1]
    assert [(m["id"], m["last_error"]) for m in failures] == [(2, "550 mailbox unavailable")]
    assert isinstance(status, dict)


# -- errors ------------------------------------------------------------------------------

async def test_bad_requests_get_error_replies_and_the_connection_stays_open(
        sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url)
    async with running_daemon(config):
        replies = await raw(
            config.daemon.control_socket,
            b"this is not json\n",
            b"[1, 2]\n",
            b'{"id": 3, "op": "explode"}\n',
            b'{"id": 4, "op": "campaign"}\n',
            b'{"id": 5, "op": "messages", "args": {"limit": "ten"}}\n',
            b'{"id": 6, "op": "campaign", "args": {"name": "nope"}}\n',
            b'{"id": 7, "op": "user", "args": []}\n',
            b'{"id": 8, "op": "hello"}\n',
        )
    hello, *rest = replies
    assert hello["hello"] == "segflowd"
    assert hello["protocol"] == 1
    codes = [(r["id"], r["ok"], r.get("error", {}).get("code")) for r in rest]  # type: ignore[union-attr]
    assert codes == [(None, False, "bad_request"), (None, False, "bad_request"),
                     (3, False, "unknown_op"), (4, False, "bad_request"),
                     (5, False, "bad_request"), (6, False, "not_found"),
                     (7, False, "bad_request"), (8, True, None)]


async def test_overlong_request_line_gets_an_error_reply(sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url)
    async with running_daemon(config):
        replies = await raw(config.daemon.control_socket, b"x" * (70 * 1024) + b"\n")
    assert replies[1]["ok"] is False
    assert "longer than" in replies[1]["error"]["message"]  # type: ignore[index]


async def test_actions_are_called_with_their_args_and_missing_ones_are_not_available(
        sqlite_url: str, folder: Path) -> None:
    calls: list[Mapping[str, object]] = []

    async def pause(args: Mapping[str, object]) -> object:
        calls.append(args)
        return {"paused": args["campaign"]}

    async def refuse(args: Mapping[str, object]) -> object:
        raise KeyError("no message 42")

    config = make_config(folder, sqlite_url)
    actions = {"campaign.pause": pause, "message.retry": refuse}
    async with running_daemon(config, actions=actions) as d, \
            await ControlClient.connect(config.daemon.control_socket) as c:
        sub = d.kernel.bus.subscribe(kinds=frozenset({"control"}))
        listed = await c.request("actions")
        result = await c.action("campaign.pause", {"campaign": "welcome"})
        with pytest.raises(ControlReplyError) as absent:
            await c.action("broadcast.launch", {"broadcast": "spring"})
        with pytest.raises(ControlReplyError) as failed:
            await c.action("message.retry", {"message": 42})
        still = await c.request("hello")
        published, _ = sub.drain()
    assert listed == ["campaign.pause", "message.retry", "report"]  # report: the control's own
    assert result == {"paused": "welcome"}
    assert calls == [{"campaign": "welcome"}]
    assert absent.value.code == "not_available"
    assert str(absent.value) == "broadcast.launch is not available in this daemon"
    assert (failed.value.code, str(failed.value)) == ("action_failed",
                                                      "message.retry: no message 42")
    assert isinstance(still, dict)
    assert [e.data["action"] for e in published] == ["campaign.pause"]


# -- the live stream ---------------------------------------------------------------------

async def test_subscription_streams_backlog_and_new_events_of_the_asked_kinds(
        sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url)
    async with running_daemon(config) as d:
        bus = d.kernel.bus
        bus.publish("flow.step", user_id="u0", campaign="welcome")
        bus.publish("event.ingested", user_id="u0", name="noise")
        c = await ControlClient.connect(config.daemon.control_socket)
        async with c:
            batches = await c.subscribe(kinds=["flow", "message.sent"], backlog=10)
            bus.publish("flow.entered", user_id="u1", campaign="welcome")
            bus.publish("event.ingested", user_id="u1", name="ignored")
            bus.publish("message.sent", user_id="u1", message_id=5)
            got: list[dict[str, object]] = []
            with anyio.fail_after(10):
                async for batch in batches:
                    got.extend(batch.events)
                    assert batch.missed == 0
                    if len(got) >= 3:
                        break
    assert [(e["kind"], e["user_id"]) for e in got] == [
        ("flow.step", "u0"), ("flow.entered", "u1"), ("message.sent", "u1")]
    assert all(isinstance(e["seq"], int) and str(e["at"]).endswith("Z") for e in got)


async def test_slow_subscriber_is_told_what_it_missed_and_never_slows_the_daemon(
        sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url)
    n = 40_000  # far more than the socket buffers and the subscriber's buffer hold
    async with running_daemon(config, stream_buffer=100) as d:
        bus = d.kernel.bus
        slow = await ControlClient.connect(config.daemon.control_socket)
        async with slow, await ControlClient.connect(config.daemon.control_socket) as other:
            batches = await slow.subscribe()
            for i in range(n):
                bus.publish("flow.step", user_id=f"u{i}", pad="x" * 64)
                if i % 2000 == 0:
                    await anyio.lowlevel.checkpoint()  # the writer fills the socket, then stalls
            # The daemon still answers others while the slow reader reads nothing.
            with anyio.fail_after(10):
                status = await other.request("status")
            assert isinstance(status, dict)
            received = missed = 0
            with anyio.fail_after(30):
                async for batch in batches:
                    received += len(batch.events)
                    missed += batch.missed
                    if received + missed >= n:
                        break
            stats = d.kernel.stats["control"]()
    assert missed > 0
    assert received + missed == n
    assert batch.missed_total == missed
    assert stats.events_missed == missed  # type: ignore[attr-defined]
    assert bus.statistics().dropped == missed


async def test_stream_ends_cleanly_when_the_daemon_stops(sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url)
    got: list[dict[str, object]] = []
    async with running_daemon(config) as d:
        c = await ControlClient.connect(config.daemon.control_socket)
        batches = await c.subscribe()
        d.kernel.bus.publish("segment.entered", user_id="u1", segment="active")
        with anyio.fail_after(10):
            batch = await batches.__anext__()
        got.extend(batch.events)
    with anyio.fail_after(10):
        rest = [b async for b in batches]
    await c.aclose()
    assert [e["kind"] for e in got] == ["segment.entered"]
    assert rest == []
    assert not config.daemon.control_socket.exists()


# -- the socket file ---------------------------------------------------------------------

async def test_socket_is_created_with_mode_0600_by_default(sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url)
    async with running_daemon(config):
        assert socket_mode(config.daemon.control_socket) == 0o600


async def test_configured_mode_and_group_are_applied(sqlite_url: str, folder: Path) -> None:
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    config = make_config(folder, sqlite_url, control_socket_mode=0o660,
                         control_socket_group=group)
    async with running_daemon(config):
        st = os.stat(config.daemon.control_socket)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, os.getgid())


def test_unknown_group_is_a_clear_error_and_leaves_no_socket(folder: Path) -> None:
    path = folder / "g.sock"
    with pytest.raises(ControlSocketError, match="no group named 'no-such-group-xyz'"):
        open_control_socket(path, 0o660, "no-such-group-xyz")
    assert not path.exists()


async def test_a_second_daemon_does_not_hijack_a_live_socket(
        sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url)
    async with running_daemon(config) as first:
        second = ControlService(first.kernel)
        with pytest.raises(ControlSocketError, match="another segflowd is already listening"):
            await second.run(task_status=anyio.TASK_STATUS_IGNORED)
        async with await ControlClient.connect(config.daemon.control_socket) as c:
            assert isinstance(await c.request("hello"), dict)  # the first still serves


def test_a_stale_socket_from_a_dead_daemon_is_replaced(folder: Path) -> None:
    path = folder / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a killed daemon leaves behind
    sock = open_control_socket(path)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))
        probe.close()
        assert socket_mode(path) == 0o600
    finally:
        sock.close()


def test_a_regular_file_at_the_socket_path_is_not_replaced(folder: Path) -> None:
    path = folder / "data.sock"
    path.write_text("important")
    with pytest.raises(ControlSocketError, match="is not a socket"):
        open_control_socket(path)
    assert path.read_text() == "important"


async def test_client_errors_are_one_clear_sentence(folder: Path) -> None:
    with pytest.raises(ControlUnavailable, match=r"no control socket at .*is segflowd running"):
        await ControlClient.connect(folder / "missing.sock")
    path = folder / "refused.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    with pytest.raises(ControlUnavailable, match="segflowd is not running"):
        await ControlClient.connect(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
async def test_permission_denied_is_one_clear_sentence(sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url, control_socket_mode=0o000)
    async with running_daemon(config):
        with pytest.raises(ControlUnavailable, match="permission denied"):
            await ControlClient.connect(config.daemon.control_socket)


async def test_a_socket_path_longer_than_the_unix_limit_still_works(
        sqlite_url: str, folder: Path) -> None:
    deep = folder / ("d" * 60) / ("e" * 60) / "segflow.sock"  # > 107 bytes: sun_path's limit
    config = make_config(folder, sqlite_url, control_socket=deep)
    async with running_daemon(config), await ControlClient.connect(deep) as c:
        assert isinstance(await c.request("hello"), dict)
        assert socket_mode(deep) == 0o600
    assert not deep.exists()
