"""The async client of the control socket, used by ``segflowd status`` and segflow-tui.

Every failure to reach the daemon is a :class:`ControlUnavailable` whose message is one
sentence a person can act on; an error reply is a :class:`ControlReplyError` with the
protocol's ``code``. Requests on one client are serialized (one reply per request, in
order), so several tasks may share a client.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from ..errors import ControlReplyError, ControlUnavailable
from .protocol import PROTOCOL_VERSION, dumps, unix_address

__all__ = ["ControlClient", "StreamBatch", "resolve_socket"]

CONNECT_TIMEOUT = 5.0  # seconds to connect and read the daemon's hello
MAX_REPLY = 64 * 1024 * 1024  # bytes: the longest reply line a client accepts


@dataclasses.dataclass(frozen=True)
class StreamBatch:
    """Events from the live stream; ``missed`` were dropped just before these."""

    events: tuple[dict[str, object], ...]
    missed: int
    missed_total: int


def resolve_socket(socket_path: str | None, config_path: str | None) -> Path:
    """``--socket PATH`` if given, else ``[daemon] control_socket`` of the config file."""
    if socket_path:
        return Path(socket_path)
    from ..config import load_config  # raises ConfigError with file and line

    return load_config(config_path).daemon.control_socket


def _unreachable(path: Path, exc: OSError) -> ControlUnavailable:
    if isinstance(exc, FileNotFoundError):
        msg = f"no control socket at {path}: is segflowd running? (see [daemon] control_socket)"
    elif isinstance(exc, PermissionError):
        msg = (f"permission denied on the control socket {path}: run as the daemon's user "
               "or as a member of [daemon] control_socket_group")
    elif isinstance(exc, ConnectionRefusedError):
        msg = f"segflowd is not running: nothing listens on the control socket {path}"
    else:
        msg = f"cannot connect to the control socket {path}: {exc.strerror or exc}"
    return ControlUnavailable(msg)


class ControlClient:
    """One connection to the daemon. Use ``async with await ControlClient.connect(p)``."""

    def __init__(self, path: Path, stream: SocketStream, hello: Mapping[str, object],
                 reader: BufferedByteReceiveStream) -> None:
        self.path = path
        self.hello = hello
        self._stream = stream
        self._reader = reader
        self._ids = itertools.count(1)
        self._lock = anyio.Lock()
        self._streaming = False

    @property
    def version(self) -> str:
        return str(self.hello.get("version", "?"))

    @classmethod
    async def connect(cls, path: Path | str, *, within: float = CONNECT_TIMEOUT,
                      ) -> ControlClient:
        """Connect and read the hello; ControlUnavailable says why it failed."""
        p = Path(path)
        try:
            with anyio.fail_after(within):
                with unix_address(p) as address:
                    stream = await anyio.connect_unix(address)
                reader = BufferedByteReceiveStream(stream)
                try:
                    hello = json.loads(await reader.receive_until(b"\n", MAX_REPLY))
                except BaseException:
                    await stream.aclose()
                    raise
        except OSError as exc:
            raise _unreachable(p, exc) from None
        except TimeoutError:
            raise ControlUnavailable(f"segflowd did not answer on {p} within {within:g}s"
                                     ) from None
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                json.JSONDecodeError, anyio.DelimiterNotFound):
            raise ControlUnavailable(f"{p} is not a segflowd control socket") from None
        if not isinstance(hello, dict) or hello.get("hello") != "segflowd":
            await stream.aclose()
            raise ControlUnavailable(f"{p} is not a segflowd control socket")
        if int(hello.get("protocol", 0)) < PROTOCOL_VERSION:
            await stream.aclose()
            raise ControlUnavailable(
                f"segflowd at {p} speaks control protocol {hello.get('protocol')}; this "
                f"client needs {PROTOCOL_VERSION} (upgrade the daemon)")
        return cls(p, stream, hello, reader)

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()

    async def _read(self) -> dict[str, object]:
        try:
            line = await self._reader.receive_until(b"\n", MAX_REPLY)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                anyio.ClosedResourceError, ConnectionError):
            raise ControlUnavailable(
                "segflowd closed the connection (stopped or restarting)") from None
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ControlUnavailable("segflowd sent something that is not a protocol line")
        return data

    async def _send(self, message: Mapping[str, object]) -> None:
        try:
            await self._stream.send(dumps(message))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
            raise ControlUnavailable(
                "segflowd closed the connection (stopped or restarting)") from None

    async def request(self, op: str, **args: object) -> object:
        """Send one request and return its ``result``; ControlReplyError on an error reply."""
        if self._streaming:
            raise RuntimeError("this connection is streaming; open another for requests")
        async with self._lock:
            rid = next(self._ids)
            await self._send({"id": rid, "op": op, "args": args})
            reply = await self._read()
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error")
        if isinstance(err, dict):
            raise ControlReplyError(str(err.get("code", "internal")),
                                    str(err.get("message", "error")))
        raise ControlReplyError("internal", "malformed error reply")

    async def action(self, name: str, args: Mapping[str, object] | None = None) -> object:
        """Run an admin action (``campaign.pause``, ...) and return what it returned."""
        return await self.request("action", name=name, args=dict(args or {}))

    async def subscribe(self, kinds: list[str] | None = None, backlog: int = 0,
                        ) -> AsyncIterator[StreamBatch]:
        """Turn this connection into the live stream; iterate it until it ends."""
        await self.request("subscribe", kinds=kinds, backlog=backlog)
        self._streaming = True
        return self._batches()

    async def _batches(self) -> AsyncIterator[StreamBatch]:
        while True:
            try:
                data = await self._read()
            except ControlUnavailable:
                return
            events = data.get("stream")
            if not isinstance(events, list):
                continue
            missed, total = data.get("missed", 0), data.get("missed_total", 0)
            yield StreamBatch(tuple(e for e in events if isinstance(e, dict)),
                              int(missed) if isinstance(missed, int) else 0,
                              int(total) if isinstance(total, int) else 0)
