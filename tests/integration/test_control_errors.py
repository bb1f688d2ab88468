"""Control socket errors that keep the connection: an empty line and a refused
``subscribe`` each get an error reply, and the next request on the same connection is
answered (docs/reference/control-protocol.md: only an over-long line closes it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from control_harness import make_config, running_daemon, short_tmp

pytestmark = pytest.mark.anyio

REPLY_BOUND = 10.0  # seconds: a reply that takes this long is taken as never coming


@pytest.fixture
def folder() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


async def exchange(path: Path, *lines: bytes) -> list[dict[str, object]]:
    """On one connection: the hello, then one reply per line sent (each sent only after
    the reply before it arrived, so a closed connection shows as a missing reply)."""
    async with await anyio.connect_unix(path) as s:
        reader = BufferedByteReceiveStream(s)
        out = [json.loads(await reader.receive_until(b"\n", 1 << 20))]
        for line in lines:
            await s.send(line)
            try:
                with anyio.fail_after(REPLY_BOUND):
                    out.append(json.loads(await reader.receive_until(b"\n", 1 << 20)))
            except (anyio.EndOfStream, anyio.IncompleteRead):
                out.append({"closed": True})
                break
            except TimeoutError:
                out.append({"unanswered": line.decode()})
                break
        return out


def code(reply: dict[str, object]) -> object:
    error = reply.get("error")
    return error.get("code") if isinstance(error, dict) else None


async def test_an_empty_line_gets_an_error_reply_and_the_connection_stays_open(
        sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url)
    async with running_daemon(config):
        replies = await exchange(config.daemon.control_socket, b"\n", b"  \t\r\n",
                                 b'{"id": 1, "op": "hello"}\n')
    assert len(replies) == 4, replies
    _, empty, blank, hello = replies
    assert (empty["id"], empty["ok"], code(empty)) == (None, False, "bad_request")
    assert "empty request line" in str(empty["error"])
    assert (blank["ok"], code(blank)) == (False, "bad_request")
    assert (hello["id"], hello["ok"]) == (1, True)


@pytest.mark.parametrize("args", [
    {"kinds": "flow"},               # not a list
    {"kinds": [1, 2]},               # not kind names
    {"backlog": 100_000},            # out of range
    {"backlog": "10"},               # not an integer
])
async def test_a_refused_subscribe_gets_an_error_and_the_connection_stays_open(
        sqlite_url: str, folder: Path, args: dict[str, object]) -> None:
    config = make_config(folder, sqlite_url)
    async with running_daemon(config):
        sub = json.dumps({"id": 5, "op": "subscribe", "args": args}).encode() + b"\n"
        replies = await exchange(config.daemon.control_socket, sub,
                                 b'{"id": 6, "op": "status"}\n')
    assert len(replies) == 3, replies
    _, refused, status = replies
    assert (refused["id"], refused["ok"], code(refused)) == (5, False, "bad_request")
    assert status.get("closed") is None, "the daemon closed the connection"
    assert (status["id"], status["ok"]) == (6, True)
    result = status["result"]
    assert isinstance(result, dict)
    assert result["protocol"] == 1


async def test_a_refused_subscribe_can_be_followed_by_a_good_one(
        sqlite_url: str, folder: Path) -> None:
    config = make_config(folder, sqlite_url)
    async with running_daemon(config):
        replies = await exchange(
            config.daemon.control_socket,
            b'{"id": 1, "op": "subscribe", "args": {"kinds": "flow"}}\n',
            b'{"id": 2, "op": "subscribe", "args": {"kinds": ["flow"]}}\n')
    assert len(replies) == 3, replies
    _, refused, accepted = replies
    assert (refused["id"], refused["ok"]) == (1, False)
    assert (accepted["id"], accepted["ok"]) == (2, True)
    assert accepted["result"] == {"subscribed": True, "buffer": 5000, "protocol": 1}
