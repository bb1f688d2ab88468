"""Run segflowd as a real process: write a segflow.toml, start it, wait for /healthz.

The ``start_daemon`` fixture is provided to every acceptance test by conftest.py; the
helpers import as ``from daemon_harness import spawn, stop, ...``. Reuse it::

    async def test_x(start_daemon, sqlite_url):       # or a plain (sync) test
        d = start_daemon(store_url=sqlite_url, app=APP_SOURCE)
        httpx.get(f"{d.base_url}/healthz")
        ...                                            # stopped with SIGTERM at teardown

``start_daemon`` writes the config into a fresh folder under ``tmp_path``, starts
``python -m segflowd.cli run --config ...`` on a free port (given as the env override
``SEGFLOW_HTTP_LISTEN`` so the same mechanism an operator uses is exercised), waits for
``GET /healthz`` to answer 200, and returns a :class:`RunningDaemon`. At teardown every
daemon still running gets SIGTERM (then SIGKILL after ``STOP_TIMEOUT``).

A module whose tests share one daemon (they use distinct user ids) starts it in a
module-scoped fixture with ``with running_daemon(folder, store_url=...) as d: yield d``;
``store_rows`` reads what it stored and ``require_program`` finds node or chromium (a
missing one skips, but fails under ``CI=true``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
import sqlalchemy as sa

START_TIMEOUT = 30.0  # seconds for the daemon to answer /healthz with 200
STOP_TIMEOUT = 10.0  # seconds for the daemon to exit after SIGTERM
API_SECRET = "acceptance-secret"

EMPTY_APP = "from segflowd import Segflow\n\napp = Segflow()\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(folder: Path, *, store_url: str, app: str = EMPTY_APP,
                 extra: str = "") -> Path:
    """Write ``app.py`` (the given source) and a ``segflow.toml`` using it into ``folder``.

    ``extra`` is appended to the TOML verbatim (more sections, e.g. ``[sources.crm]``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(app, encoding="utf-8")
    config = folder / "segflow.toml"
    config.write_text(f"""
[daemon]
app = "app.py:app"
control_socket = "run/segflow.sock"
log_format = "json"
drain_timeout = 5.0
[store]
url = "{store_url}"
start_retry_max = 1.0
[http]
listen = "127.0.0.1:8787"
public_url = "http://127.0.0.1:8787"
[[http.keys]]
name = "default"
secret = "{API_SECRET}"
[email]
from = "Acceptance <acceptance@example.com>"
provider = "outbox"
[providers.outbox]
plugin = "outbox"
path = "var/outbox"
{extra}
""", encoding="utf-8")
    return config


def spawn(config: Path, *, args: tuple[str, ...] = ("run",),
          env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m segflowd.cli ARGS --config CONFIG``.

    stdout and stderr go to ``stdout.log``/``stderr.log`` beside the config (files, not
    pipes, so a chatty daemon never blocks on a full pipe); :func:`stop` returns them.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SEGFLOW_")}
    full_env.pop("NOTIFY_SOCKET", None)
    full_env.pop("WATCHDOG_USEC", None)
    full_env.update(env or {})
    paths = (config.parent / "stdout.log", config.parent / "stderr.log")
    with paths[0].open("w") as out, paths[1].open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "segflowd.cli", *args, "--config", str(config)],
            cwd=config.parent, env=full_env, text=True, stdout=out, stderr=err,
        )
    _LOGS[process.pid] = paths
    return process


_LOGS: dict[int, tuple[Path, Path]] = {}  # pid -> (stdout, stderr) files of spawn()


def output(process: subprocess.Popen[str]) -> tuple[str, str]:
    """What the process wrote so far to stdout and stderr (see :func:`spawn`)."""
    out, err = _LOGS[process.pid]
    return (out.read_text(encoding="utf-8", errors="replace"),
            err.read_text(encoding="utf-8", errors="replace"))


def stop(process: subprocess.Popen[str], sig: int = signal.SIGTERM,
         timeout: float = STOP_TIMEOUT) -> tuple[int, str, str]:
    """Send ``sig``, wait for the exit; return (status, stdout, stderr). SIGKILL on timeout."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        out, err = output(process)
        pytest.fail(f"segflowd did not exit within {timeout} s of {signal.Signals(sig).name}:"
                    f"\n{out}\n{err}")
    out, err = output(process)
    return process.returncode, out, err


@dataclasses.dataclass
class RunningDaemon:
    base_url: str
    process: subprocess.Popen[str]
    config_path: Path
    store_url: str = ""  # set by launch()

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str, str]:
        return stop(self.process, sig)

    def __iter__(self) -> Iterator[object]:
        """Unpacks as ``base_url, process, config_path = start_daemon(...)``."""
        return iter((self.base_url, self.process, self.config_path))


def wait_healthy(base_url: str, process: subprocess.Popen[str],
                 timeout: float = START_TIMEOUT) -> httpx.Response:
    """Poll ``GET /healthz`` until 200; fail with the daemon's output if it dies or times out."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, err = output(process)
            pytest.fail(f"segflowd exited with {process.returncode} before ready:\n{out}\n{err}")
        try:
            r = httpx.get(f"{base_url}/healthz", timeout=2.0)
            if r.status_code == 200:
                return r
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    process.kill()
    process.wait()
    out, err = output(process)
    pytest.fail(f"segflowd not healthy within {timeout} s (last: {last!r}):\n{out}\n{err}")


def launch(folder: Path, *, store_url: str, app: str = EMPTY_APP, extra: str = "",
           env: Mapping[str, str] | None = None, files: Mapping[str, str] | None = None,
           started: list[RunningDaemon] | None = None) -> RunningDaemon:
    """Write the config (and ``files``: relative path -> text) into ``folder``, start
    segflowd on a free port and wait until it is healthy. ``started`` gets the daemon
    appended before the wait (the ``start_daemon`` fixture's list, which it stops)."""
    port = free_port()
    config = write_config(folder, store_url=store_url, app=app, extra=extra)
    for name, text in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    process = spawn(config, env={"SEGFLOW_HTTP_LISTEN": f"127.0.0.1:{port}",
                                 "SEGFLOW_HTTP_PUBLIC_URL": f"http://127.0.0.1:{port}",
                                 **(env or {})})
    d = RunningDaemon(f"http://127.0.0.1:{port}", process, config, store_url)
    if started is not None:
        started.append(d)
    wait_healthy(d.base_url, process)  # kills the process when it fails
    return d


@contextlib.contextmanager
def running_daemon(folder: Path, **kwargs: Any) -> Iterator[RunningDaemon]:
    """:func:`launch` as a context manager, for module-scoped fixtures (one daemon shared
    by a module's tests): stopped with SIGTERM on exit, which must end it with status 0."""
    d = launch(folder, **kwargs)
    try:
        yield d
    finally:
        status, out, err = stop(d.process)
        assert status == 0, f"segflowd exited with {status}:\n{out[-3000:]}\n{err[-3000:]}"


def store_rows(store_url: str, statement: sa.Executable) -> list[sa.RowMapping]:
    """Run ``statement`` on the store behind ``store_url`` (SQLite or MariaDB) with a
    synchronous driver, so a plain test reads what the daemon wrote."""
    url = sa.engine.make_url(store_url)
    sync = url.set(drivername="sqlite" if url.drivername.startswith("sqlite")
                   else "mysql+pymysql")
    engine = sa.create_engine(sync, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return list(conn.execute(statement).mappings())
    finally:
        engine.dispose()


def _missing(message: str) -> NoReturn:
    """Skip with ``message``; under ``CI=true`` fail instead (CI installs what is missing)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}, and CI=true requires it")
    pytest.skip(message)


def require_program(name: str, *candidates: str) -> str:
    """The path of the first of ``candidates`` (default: ``name``) found on PATH."""
    for candidate in candidates or (name,):
        found = shutil.which(candidate)
        if found:
            return found
    _missing(f"{name} is not installed ({' or '.join(candidates or (name,))} not on PATH); "
             ".ci/run installs it")


CLIENTS_DIR = Path(__file__).resolve().parents[1] / "clients"  # the npm clients' folder


def require_npm_clients() -> str:
    """node's path, once tests/clients has its npm packages (``npm ci`` there)."""
    node = require_program("node", "node", "nodejs")
    if not (CLIENTS_DIR / "node_modules" / ".package-lock.json").is_file():
        _missing(f"the npm packages of {CLIENTS_DIR} are not installed: run `npm ci` there "
                 "(.ci/run does)")
    return node


StartDaemon = Callable[..., RunningDaemon]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """A factory: ``start_daemon(store_url=..., app=EMPTY_APP, extra="", env={})``."""
    running: list[RunningDaemon] = []

    def start(*, store_url: str, app: str = EMPTY_APP, extra: str = "",
              env: Mapping[str, str] | None = None) -> RunningDaemon:
        return launch(tmp_path / f"d{len(running)}", store_url=store_url, app=app,
                      extra=extra, env=env, started=running)

    yield start
    for d in running:
        if d.process.poll() is None:
            stop(d.process)
