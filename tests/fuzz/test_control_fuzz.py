"""The control socket under random and malformed request lines (docs/reference/control-protocol.md).

Against the whole daemon in-process: every line gets exactly one reply, a JSON object
that is either ``ok`` or an error with a documented code (never ``internal``, which is
a bug); the connection stays open and still answers a good request after, except after
a line over 64 KiB, which is answered and then closed. The daemon keeps serving both
the socket and HTTP afterwards.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from asgi_daemon import asgi_call, running
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segflowd.control.protocol import ERROR_CODES, MAX_LINE, OPS, unix_address
from segflowd.daemon import Daemon

pytestmark = pytest.mark.anyio

REPLY_TIMEOUT = 30.0  # seconds for one reply (generous: a reply normally takes ms)
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
ARG_NAMES = ("name", "id", "limit", "failures", "campaign", "kinds", "backlog", "args",
             "template", "to", "user", "data", "segment", "message", "instance", "source",
             "rate", "broadcast")
# The actions a full daemon registers, plus names nobody registered.
ACTION_NAMES = ("campaign.pause", "campaign.resume", "segment.refresh", "email.test",
                "message.retry", "instance.terminate", "instance.restart", "instance.wake",
                "audiences.list", "broadcast.launch", "nope", "", "campaign.pause ")

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=20), st.sampled_from(["", "welcome", "u1", "1"]),
                         st.integers(-2**70, 2**70))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
args = st.dictionaries(st.sampled_from(ARG_NAMES), st.one_of(
    json_values, st.sampled_from(ACTION_NAMES),
    st.dictionaries(st.sampled_from(ARG_NAMES), json_values, max_size=3)), max_size=4)
requests = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from([op for op in OPS if op != "subscribe"]),
                     st.text(max_size=10), json_values)},
    optional={"id": json_values, "args": st.one_of(args, json_values), "extra": json_values})
# Lines that are not requests at all, or not JSON, or JSON Python reads and others do not.
RAW = [b"", b" ", b"null", b"[]", b"[1, 2]", b"42", b'"op"', b"{", b"}", b'{"op": }',
       b'{"op": "hello",}', b"\xff\xfe\xfd", b'{"op": "hello", "id": "\xc3\x28"}',
       b'{"op": "hello", "id": NaN}', b'{"op": "hello", "id": -Infinity}',
       b'{"op": "hello", "id": 1e400}', b'{"op": "hello", "id": ' + b"9" * 5000 + b"}",
       b'{"op": "hello", "id": "\\ud800"}', b'{"op": "user", "args": {"id": "\\udfff"}}',
       b'{"op": "campaign", "args": {"name": "\\ud800x"}}', b"[" * 5000 + b"]" * 5000,
       b'{"a":' * 3000 + b"1" + b"}" * 3000, b'{"id": ' + b"[" * 5000 + b"]" * 5000 + b"}",
       b"\x00" * 10, b'{"op": "hello"}\r', b"\t{\"op\":\"hello\"}"]


def encode(request: dict[str, object]) -> bytes:
    return json.dumps(request).encode()


lines = st.one_of(requests.map(encode), requests.map(encode), st.sampled_from(RAW),
                  st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")))


async def connect(path: Path) -> SocketStream:
    with unix_address(path) as address:
        return await anyio.connect_unix(address)


def _not_json(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def strict_json(line: bytes) -> object:
    """Standard JSON only: no NaN or Infinity, no unpaired surrogates (they are no text)."""
    data = json.loads(line, parse_constant=_not_json, parse_float=_finite)
    json.dumps(data, ensure_ascii=False).encode()  # UnicodeEncodeError on a lone surrogate
    return data


async def read_line(reader: BufferedByteReceiveStream) -> dict[str, object]:
    with anyio.fail_after(REPLY_TIMEOUT):
        line = await reader.receive_until(b"\n", 50 * 1024 * 1024)
    reply = strict_json(line)  # any JSON parser must read what the daemon writes
    assert isinstance(reply, dict), line[:200]
    return reply


def expected_id(line: bytes) -> object:
    """The id a reply echoes: the request's, when the line is a standard JSON object."""
    try:
        data = strict_json(line)
    except (ValueError, RecursionError):
        return None
    return data.get("id") if isinstance(data, dict) else None


def assert_reply(reply: dict[str, object], line: bytes) -> None:
    assert set(reply) <= {"id", "ok", "result", "error"}, reply
    assert isinstance(reply["ok"], bool), reply
    if reply["ok"]:
        assert "result" in reply
        return
    error = reply["error"]
    assert isinstance(error, dict), reply
    assert error["code"] in ERROR_CODES, reply
    assert error["code"] != "internal", (line[:200], reply)  # "internal" means a bug
    assert isinstance(error["message"], str), reply
    assert "Traceback" not in error["message"]


@pytest.fixture
async def daemon(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running(tmp_path / "d", sqlite_url) as d:
        yield d
        # Still serving: a new connection's status, and HTTP health.
        async with await connect(d.config.daemon.control_socket) as s:
            reader = BufferedByteReceiveStream(s)
            assert (await read_line(reader))["hello"] == "segflowd"
            await s.send(b'{"id": "last", "op": "status"}\n')
            reply = await read_line(reader)
            assert reply["ok"] is True
            assert reply["id"] == "last"
        assert (await asgi_call(d.router, "GET", b"/healthz")).status == 200


@FUZZ
@given(batch=st.lists(lines, min_size=1, max_size=6))
async def test_every_line_gets_one_documented_reply_and_the_connection_stays_usable(
        daemon: Daemon, batch: list[bytes]) -> None:
    async with await connect(daemon.config.daemon.control_socket) as s:
        reader = BufferedByteReceiveStream(s)
        hello = await read_line(reader)
        assert hello["hello"] == "segflowd"
        for line in batch:
            await s.send(line + b"\n")
            reply = await read_line(reader)
            if not line.strip():  # a blank line is answered, the connection kept
                assert reply == {"id": None, "ok": False, "error": {
                    "code": "bad_request", "message": "empty request line"}}
                continue
            assert_reply(reply, line)
            assert reply["id"] == expected_id(line), (line[:200], reply)
        await s.send(b'{"id": "check", "op": "hello"}\n')
        reply = await read_line(reader)
        assert reply == {"id": "check", "ok": True, "result": reply["result"]}


@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(size=st.integers(MAX_LINE + 1, 4 * MAX_LINE), fill=st.sampled_from([b"x", b"{", b"\xff"]))
async def test_a_line_over_64_kib_is_answered_then_closed(daemon: Daemon, size: int,
                                                          fill: bytes) -> None:
    async with await connect(daemon.config.daemon.control_socket) as s:
        reader = BufferedByteReceiveStream(s)
        await read_line(reader)

        async def flood() -> None:  # the daemon may close before it has read it all
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await s.send(fill * size + b"\n")

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            reply = await read_line(reader)
            assert reply["ok"] is False
            assert reply["id"] is None
            assert reply["error"] == {"code": "bad_request", "message": reply["error"]["message"]}
            assert "longer than" in reply["error"]["message"]
            with anyio.fail_after(REPLY_TIMEOUT):
                # closed: EOF, or a reset since the rest of the line was never read
                with pytest.raises((anyio.EndOfStream, anyio.IncompleteRead,
                                    anyio.BrokenResourceError)):
                    await reader.receive_until(b"\n", 1024)
            tg.cancel_scope.cancel()
