"""The Daemon in-process on a real SQLite store: start order, bounded drain, listener errors."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import httpx
import pytest
from anyio.abc import TaskStatus

from segflowd import Segflow
from segflowd.config import Config, load_config
from segflowd.daemon import Daemon, Service
from segflowd.errors import ListenError
from segflowd.http import Request, Response, Router, json_response

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(tmp_path: Path, port: int, drain: float = 5.0) -> Config:
    path = tmp_path / "segflow.toml"
    path.write_text(f"""
[daemon]
app = "unused.py"
drain_timeout = {drain}
[store]
url = "sqlite+aiosqlite:///var/s.db"
[http]
listen = "127.0.0.1:{port}"
[providers.outbox]
plugin = "outbox"
""")
    return load_config(path, {})


class Recorder:
    """A service that logs what the daemon asks of it; ``hang`` makes its drain never end."""

    def __init__(self, name: str, log: list[str], hang: bool = False) -> None:
        self.name = name
        self.log = log
        self.hang = hang

    def register_routes(self, router: Router) -> None:
        async def hello(request: Request) -> Response:
            return json_response({"service": self.name})

        router.add("GET", f"/{self.name}", hello)
        self.log.append(f"routes {self.name}")

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        self.log.append(f"start {self.name}")
        task_status.started()
        await anyio.sleep_forever()

    async def drain(self) -> None:
        self.log.append(f"drain {self.name}")
        if self.hang:
            await anyio.sleep_forever()


async def wait_ready(daemon: Daemon) -> None:
    with anyio.fail_after(10):
        while not daemon.statistics().ready:  # noqa: ASYNC110 - readiness is a flag, no event
            await anyio.sleep(0.01)


async def test_services_start_in_order_serve_routes_and_drain_in_reverse(tmp_path: Path) -> None:
    log: list[str] = []
    port = free_port()
    services: list[Service] = [Recorder("a", log), Recorder("b", log)]
    daemon = Daemon(config(tmp_path, port), Segflow(), services=services)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await wait_ready(daemon)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/b")).json() == {"service": "b"}
            health = await client.get("/healthz")
            assert health.status_code == 200
            assert health.json()["store"] == "ok"
            missing = await client.get("/nope")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"]
        assert daemon.kernel.stats["daemon"]().ready is True  # type: ignore[attr-defined]
        daemon.request_stop()
    assert log == ["routes a", "routes b", "start a", "start b", "drain b", "drain a"]
    assert daemon.statistics().stopping is True
    assert (tmp_path / "var" / "s.db").exists()  # relative to the config file


async def test_a_hanging_drain_is_cut_at_drain_timeout(tmp_path: Path) -> None:
    log: list[str] = []
    daemon = Daemon(config(tmp_path, free_port(), drain=0.3), Segflow(),
                    services=[Recorder("stuck", log, hang=True)])
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            await wait_ready(daemon)
            daemon.request_stop()
    assert log[-1] == "drain stuck"


async def test_a_busy_port_is_one_clear_listen_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = Daemon(config(tmp_path, port), Segflow(), services=[])
        with pytest.raises(ListenError) as info:  # itself, not inside an exception group
            await daemon.run()
    assert f"cannot listen on 127.0.0.1:{port}" in str(info.value)


async def test_healthz_is_503_with_retry_after_when_the_store_does_not_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    daemon = Daemon(config(tmp_path, port), Segflow(), services=[])
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await wait_ready(daemon)

        async def store_down(limit: float = 2.0) -> bool:
            return False

        monkeypatch.setattr(daemon.store, "ping", store_down)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.get("/healthz")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        assert r.json()["store"] == "unreachable"
        daemon.request_stop()
    assert "daemon.ready" in [e.kind for e in daemon.bus.recent]

