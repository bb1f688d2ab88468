"""The Daemon in-process on a real SQLite store: start order, bounded drain, listener errors;
the store's daemon lock on SQLite and MariaDB (held, refused to a second daemon, taken
again after its connection drops, given up to another daemon by stopping)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import sqlalchemy as sa
from anyio.abc import TaskStatus

from segflowd import Segflow
from segflowd import lock as daemon_lock
from segflowd.config import Config, load_config
from segflowd.daemon import Daemon, Service
from segflowd.errors import ListenError, StoreLocked
from segflowd.http import Request, Response, Router, json_response
from segflowd.store import Store

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(tmp_path: Path, port: int, drain: float = 5.0,
           store_url: str = "sqlite+aiosqlite:///var/s.db") -> Config:
    path = tmp_path / "segflow.toml"
    path.write_text(f"""
[daemon]
app = "unused.py"
drain_timeout = {drain}
[store]
url = "{store_url}"
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



# -- the daemon lock -----------------------------------------------------------------------

async def test_a_second_daemon_on_the_same_sqlite_file_is_refused_naming_this_process(
        tmp_path: Path) -> None:
    first = Daemon(config(tmp_path, free_port()), Segflow(), services=[])
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        await wait_ready(first)
        assert first.lock.statistics().held is True
        second = Daemon(config(tmp_path, free_port()), Segflow(), services=[])
        with pytest.raises(StoreLocked) as info:  # itself, not inside an exception group
            await second.run()
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(info.value)
        assert str(tmp_path / "var" / "s.db.lock") in str(info.value)
        assert first.statistics().stopping is False
        first.request_stop()
    assert first.lock.statistics().held is False
    third = Daemon(config(tmp_path, free_port()), Segflow(), services=[])
    async with anyio.create_task_group() as tg:
        tg.start_soon(third.run)
        await wait_ready(third)  # the lock went with the first daemon
        third.request_stop()


async def test_an_in_memory_sqlite_store_takes_no_lock(tmp_path: Path) -> None:
    daemon = Daemon(config(tmp_path, free_port(), store_url="sqlite+aiosqlite:///:memory:"),
                    Segflow(), services=[])
    assert daemon.lock.statistics().kind == "none"


@pytest.fixture
def admin(mariadb_url: str) -> Iterator[sa.Connection]:
    """A connection to the MariaDB server of ``mariadb_url``, as an operator has."""
    engine = sa.create_engine(sa.engine.make_url(mariadb_url).set(drivername="mysql+pymysql"),
                              poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        yield conn
    engine.dispose()


def holder(admin: sa.Connection, database: str) -> int | None:
    cid = admin.execute(sa.text("SELECT IS_USED_LOCK(:n)"),
                        {"n": daemon_lock.lock_name(database)}).scalar()
    return None if cid is None else int(cid)


@pytest.mark.mariadb
async def test_a_dropped_lock_connection_is_taken_again_and_the_daemon_goes_on(
        tmp_path: Path, mariadb_url: str, admin: sa.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_lock, "WATCH_INTERVAL", 0.1)
    database = str(sa.engine.make_url(mariadb_url).database)
    daemon = Daemon(config(tmp_path, free_port(), store_url=mariadb_url), Segflow(),
                    services=[])
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await wait_ready(daemon)
        first = holder(admin, database)
        assert first is not None
        admin.execute(sa.text("KILL :id"), {"id": first})  # a server restart, a network cut
        with anyio.fail_after(10):
            while daemon.lock.statistics().reacquired == 0:  # noqa: ASYNC110 - a counter, no event
                await anyio.sleep(0.05)
        again = holder(admin, database)
        assert again is not None
        assert again != first
        assert daemon.statistics().stopping is False
        daemon.request_stop()
    assert holder(admin, database) is None  # released at shutdown


@pytest.mark.mariadb
async def test_a_lock_taken_by_another_while_dropped_drains_and_stops_the_daemon(
        tmp_path: Path, mariadb_url: str, admin: sa.Connection) -> None:
    database = str(sa.engine.make_url(mariadb_url).database)
    log: list[str] = []
    daemon = Daemon(config(tmp_path, free_port(), store_url=mariadb_url), Segflow(),
                    services=[Recorder("a", log)])
    raised: list[StoreLocked] = []

    async def run() -> None:
        try:
            await daemon.run()
        except StoreLocked as exc:
            raised.append(exc)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_ready(daemon)
            first = holder(admin, database)
            assert first is not None
            admin.execute(sa.text("KILL :id"), {"id": first})
            # Another daemon takes the lock before this one looks again (this blocks the
            # loop, so the daemon cannot look meanwhile).
            got, other = admin.execute(sa.text("SELECT GET_LOCK(:n, 5), CONNECTION_ID()"),
                                       {"n": daemon_lock.lock_name(database)}).one()
            assert got == 1
    assert len(raised) == 1
    assert "lost the store lock" in str(raised[0])
    assert f"server connection {other} from " in str(raised[0])
    assert log[-1] == "drain a"  # a graceful stop, not a crash
    assert daemon.statistics().stopping is True


async def test_taking_the_lock_on_a_server_that_never_answers_is_retried_not_hung(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen MySQL server (SIGSTOP) accepts connections and says nothing: the lock's
    connect and GET_LOCK must give up and retry, not hang the daemon's start."""
    monkeypatch.setattr(daemon_lock, "CHECK_TIMEOUT", 0.3)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepted by the kernel, never answered: no greeting comes
    port = silent.getsockname()[1]
    store = Store.open(f"mysql+aiomysql://root@127.0.0.1:{port}/test", connect_timeout=0.3)
    lock = daemon_lock.DaemonLock.for_store(store, connect_timeout=0.3)
    retries: list[str] = []
    scope = anyio.CancelScope()

    def on_retry(attempt: int, delay: float, error: str) -> None:
        retries.append(error)
        if len(retries) == 2:  # it gave up twice and goes on trying: enough
            scope.cancel()

    try:
        with anyio.move_on_after(10), scope:
            await lock.acquire(retry_max=0.05, on_retry=on_retry)
    finally:
        await lock.release()
        await store.close()
        silent.close()
    assert len(retries) >= 2, retries
    assert lock.statistics().held is False
