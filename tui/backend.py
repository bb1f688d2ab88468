"""Where the TUI gets its data: the daemon's control socket (or a fixed fake in tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Protocol

from segflowd.control.client import ControlClient, StreamBatch
from segflowd.errors import ControlUnavailable

__all__ = ["Backend", "SocketBackend"]


class Backend(Protocol):
    """The TUI's only channel to a daemon. Every method may raise ControlUnavailable."""

    description: str

    async def connect(self) -> str:
        """(Re)connect; return the daemon's version."""
        ...

    async def request(self, op: str, **args: object) -> object: ...

    async def action(self, name: str, args: Mapping[str, object]) -> object: ...

    def stream(self) -> AsyncIterator[StreamBatch]:
        """The live events; ends when the daemon goes away."""
        ...

    async def close(self) -> None: ...


class SocketBackend:
    """Two connections to the control socket: one for requests, one for the stream."""

    def __init__(self, path: Path, *, backlog: int = 200) -> None:
        self.path = path
        self.description = str(path)
        self.backlog = backlog
        self._client: ControlClient | None = None
        self._stream: ControlClient | None = None

    async def connect(self) -> str:
        await self.close()
        self._client = await ControlClient.connect(self.path)
        self._stream = await ControlClient.connect(self.path)
        return self._client.version

    def _need(self) -> ControlClient:
        if self._client is None:
            raise ControlUnavailable("not connected to segflowd")
        return self._client

    async def request(self, op: str, **args: object) -> object:
        return await self._need().request(op, **args)

    async def action(self, name: str, args: Mapping[str, object]) -> object:
        return await self._need().action(name, args)

    async def stream(self) -> AsyncIterator[StreamBatch]:
        if self._stream is None:
            raise ControlUnavailable("not connected to segflowd")
        async for batch in await self._stream.subscribe(backlog=self.backlog):
            yield batch

    async def close(self) -> None:
        for client in (self._client, self._stream):
            if client is not None:
                await client.aclose()
        self._client = self._stream = None
