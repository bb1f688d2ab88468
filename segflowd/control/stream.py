"""The control socket's live stream: a connection that sent ``subscribe`` reads the bus.

The reply confirms the subscription (with its buffer size); then come lines of
``{"stream": [...events], "missed": n, "missed_total": n}``, first the asked-for backlog of
recent events, then what the bus publishes, gathered into batches. Each subscriber reads
through its own bounded buffer, so a slow or stuck client only misses events (and is told
how many); it never slows the daemon. The stream ends when the client closes the
connection or the daemon drains.
"""

from __future__ import annotations

import contextlib

import anyio
import structlog
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

from ..bus import RECENT, BusEvent, Subscription
from ..kernel import Kernel
from .protocol import PROTOCOL_VERSION, BadRequest, Request, dumps, error_reply, ok_reply

__all__ = ["Streams"]

log = structlog.get_logger("segflowd.control")

STREAM_BUFFER = 5_000  # events a subscriber may lag behind before it misses some
STREAM_BATCH = 500  # events sent in one stream line at most
STREAM_COALESCE = 0.005  # seconds a stream line waits for more events after the first


class Streams:
    """The control service's subscribers, and what they were sent or missed."""

    def __init__(self, kernel: Kernel, buffer: int = STREAM_BUFFER) -> None:
        self.kernel = kernel
        self.buffer = buffer
        self.subs: set[Subscription] = set()
        self.streamed = self.missed = 0
        self.errors = 0  # subscribe requests refused

    def close_all(self) -> None:
        """End every stream: its subscriber sees EOF."""
        for sub in tuple(self.subs):
            sub.close()

    async def serve(self, req: Request, stream: SocketStream,
                    reader: BufferedByteReceiveStream) -> bool:
        """Answer ``req`` (a ``subscribe``) and stream events until either side stops.

        False when the request was refused (an error reply was sent and nothing streamed:
        the connection may go on); True once it streamed and the stream has ended."""
        kinds = req.args.get("kinds")
        if kinds is not None and (not isinstance(kinds, list)
                                  or not all(isinstance(x, str) and x for x in kinds)):
            await stream.send(error_reply(req.id, "bad_request",
                                          "subscribe: 'kinds' must be a list of kind names"))
            self.errors += 1
            return False
        try:
            backlog = req.int_arg("backlog", 0, lo=0, hi=RECENT)
        except BadRequest as exc:
            self.errors += 1
            await stream.send(error_reply(req.id, exc.code, str(exc)))
            return False
        wanted = frozenset(kinds) if kinds else None
        bus = self.kernel.bus
        # Take the backlog and subscribe with no await between: no gap and no repeat.
        recent = [e for e in bus.recent if wanted is None or _matches(e.kind, wanted)]
        sub = bus.subscribe(buffer=self.buffer, kinds=wanted)
        self.subs.add(sub)
        log.info("control.subscribed", kinds=sorted(wanted) if wanted else None)
        try:
            await stream.send(ok_reply(req.id, {"subscribed": True, "buffer": self.buffer,
                                                "protocol": PROTOCOL_VERSION}))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._until_closed, reader, tg)
                if backlog and recent:
                    await self._send_batch(stream, recent[-backlog:], 0, sub)
                while True:
                    event, missed = await sub.receive()
                    if sub.pending() < STREAM_BATCH:
                        # Let a burst gather: one line and one syscall for many events.
                        # Real time on purpose: this paces the transport, not the domain,
                        # and a FakeClock must not stall the stream.
                        await anyio.sleep(STREAM_COALESCE)
                    more, missed_more = sub.drain(STREAM_BATCH - 1)
                    await self._send_batch(stream, [event, *more], missed + missed_more, sub)
        except anyio.EndOfStream:
            pass  # the subscription was closed by drain()
        except BaseExceptionGroup as group:
            if not all(isinstance(e, _DISCONNECTS) for e in _leaves(group)):
                raise
        finally:
            sub.close()
            self.subs.discard(sub)
        return True

    async def _send_batch(self, stream: SocketStream, batch: list[BusEvent], missed: int,
                          sub: Subscription) -> None:
        self.missed += missed
        self.streamed += len(batch)
        await stream.send(dumps({"stream": [e.as_json() for e in batch], "missed": missed,
                                 "missed_total": sub.missed_total}))

    async def _until_closed(self, reader: BufferedByteReceiveStream, tg: TaskGroup) -> None:
        # A streaming connection only streams; what the client sends is ignored until EOF.
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                 anyio.ClosedResourceError, ConnectionError):
            while True:
                await reader.receive()
        tg.cancel_scope.cancel()


_DISCONNECTS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                ConnectionError)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _matches(kind: str, kinds: frozenset[str]) -> bool:
    return kind in kinds or kind.split(".", 1)[0] in kinds
