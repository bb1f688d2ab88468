"""segflowd in-process: the whole daemon on a real store, its router called as raw ASGI.

:func:`running` starts :class:`~segflowd.daemon.Daemon` with every service (ingest's
committer, segments, flows, delivery, control) exactly as ``segflowd run`` would, with
the config the acceptance harness writes; :func:`asgi_call` then sends one request to
its router with full control over the bytes (raw path, any header, chunked or garbled
bodies), which an HTTP client would refuse to send. :func:`assert_sane` is the property
every reply must have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
from daemon_harness import EMPTY_APP, write_config

from segflowd.app import Segflow
from segflowd.config import load_config
from segflowd.daemon import Daemon
from segflowd.delivery.service import DeliveryService
from segflowd.delivery.tokens import Signer
from segflowd.http import Router

__all__ = ["Reply", "asgi_call", "assert_sane", "running", "signer_of"]

START_TIMEOUT = 30.0  # seconds for the in-process daemon to be ready


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]  # names lowercased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@contextlib.asynccontextmanager
async def running(folder: Path, store_url: str, *, app: Segflow | None = None, extra: str = "",
                  environ: Mapping[str, str] | None = None) -> AsyncIterator[Daemon]:
    """The daemon with all its services, ready; stopped gracefully on exit.

    The HTTP listener binds a free port (nothing here uses it); ``environ`` holds
    ``SEGFLOW_*`` overrides, as an operator's environment would.
    """
    path = write_config(folder, store_url=store_url, app=EMPTY_APP, extra=extra)
    config = load_config(path, environ=dict(environ or {}))
    config = dataclasses.replace(config, http=dataclasses.replace(config.http,
                                                                  listen="127.0.0.1:0"))
    daemon = Daemon(config, app or Segflow())
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(START_TIMEOUT):
            while not daemon.statistics().ready:  # noqa: ASYNC110 - the daemon has no ready event
                await anyio.sleep(0.01)
        try:
            yield daemon
        finally:
            daemon.request_stop()


def signer_of(daemon: Daemon) -> Signer:
    """The signer the daemon's delivery signs (and its routes verify) link tokens with."""
    for service in daemon.services:
        if isinstance(service, DeliveryService):
            return service.signer
    raise LookupError("the daemon has no delivery service")


async def asgi_call(app: Router, method: str, raw_path: bytes,
                    headers: Sequence[tuple[bytes, bytes]] = (),
                    body: bytes | Sequence[bytes] = b"", query: bytes = b"") -> Reply:
    """One request as uvicorn would hand it over: ``path`` is the percent-decoded raw path.

    ``body`` given as several chunks arrives in that many ``http.request`` messages.
    Exactly one response must be sent; anything the app raises propagates (a crash).
    """
    chunks = [body] if isinstance(body, bytes) else (list(body) or [b""])
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path, "query_string": query, "root_path": "",
        "headers": list(headers), "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8787),
    }

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        return {"type": "http.disconnect"}

    started: list[dict[str, Any]] = []
    bodies: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert not started, "a second http.response.start"
            started.append(message)
        elif message["type"] == "http.response.body":
            assert started, "a body before http.response.start"
            bodies.append(message.get("body", b""))

    await app(scope, receive, send)
    assert len(started) == 1, "no response was sent"
    head = started[0]
    names = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head["headers"]}
    return Reply(head["status"], names, b"".join(bodies))


def assert_sane(reply: Reply, what: object = "") -> None:
    """No 5xx, no traceback text, and every error is the JSON error object."""
    assert reply.status < 500, f"{what}: {reply.status} {reply.body[:300]!r}"
    assert b"Traceback" not in reply.body, what
    assert b'File "' not in reply.body, what
    assert int(reply.headers["content-length"]) == len(reply.body), what
    if reply.status >= 400:
        assert reply.headers["content-type"] == "application/json", what
        body = reply.json()
        assert set(body) == {"code", "message", "error"}, what
        assert (body["code"], body["message"]) == tuple(body["error"].values()), what
        assert set(body["error"]) == {"code", "message"}, what
        assert isinstance(body["error"]["code"], str), what
        assert isinstance(body["error"]["message"], str), what
