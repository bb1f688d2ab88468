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
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest

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


StartDaemon = Callable[..., RunningDaemon]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """A factory: ``start_daemon(store_url=..., app=EMPTY_APP, extra="", env={})``."""
    running: list[RunningDaemon] = []

    def start(*, store_url: str, app: str = EMPTY_APP, extra: str = "",
              env: Mapping[str, str] | None = None) -> RunningDaemon:
        port = free_port()
        config = write_config(tmp_path / f"d{len(running)}", store_url=store_url, app=app,
                              extra=extra)
        process = spawn(config, env={"SEGFLOW_HTTP_LISTEN": f"127.0.0.1:{port}",
                                     "SEGFLOW_HTTP_PUBLIC_URL": f"http://127.0.0.1:{port}",
                                     **(env or {})})
        d = RunningDaemon(f"http://127.0.0.1:{port}", process, config)
        running.append(d)
        wait_healthy(d.base_url, process)
        return d

    yield start
    for d in running:
        if d.process.poll() is None:
            stop(d.process)
