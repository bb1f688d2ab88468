"""Slow and idle clients cannot take the HTTP listener: idle sockets, slowloris headers and
stalled bodies are closed within their bounds, oversized headers get 431, a full house of
busy connections gets 503, and real clients keep being served throughout.

The daemon is a process of its own limited to 1,024 open files (RLIMIT_NOFILE); every
socket is on loopback and every wait below is bounded, so the test stops by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from daemon_harness import API_SECRET, START_TIMEOUT, free_port, write_config
from fault_harness import log_events

from segflowd.config import load_config
from segflowd.errors import ConfigError

pytestmark = pytest.mark.slow

NOFILE = 1024  # the daemon's open-files limit (soft and hard)
IDLE_SOCKETS = 1100
SLOWLORIS = 500
STALLED_BODIES = 100
HEADER_TIMEOUT = 3.0  # seconds, [http] header_timeout of these daemons
BODY_TIMEOUT = 3.0  # seconds, [http] body_timeout
KEEPALIVE_TIMEOUT = 2.0  # seconds, [http] keepalive_timeout
CLOSE_SLACK = 10.0  # seconds past a bound within which the closes must all have happened
DRIP_EVERY = 1.0  # seconds between two header lines of a slowloris client
REQUEST_TIMEOUT = 10.0  # seconds a real client waits for one answer
STOP_TIMEOUT = 15.0  # seconds for the daemon to exit after SIGTERM
FD_RESERVE = 128  # segflowd.httpguard.FD_RESERVE: the cap is the limit less this


@contextlib.contextmanager
def daemon(folder: Path, store_url: str, env: dict[str, str],
           nofile: int | None = None) -> Iterator[tuple[str, Path]]:
    """segflowd on a free port, its open files limited to ``nofile``; killed at the end."""
    config = write_config(folder, store_url=store_url)
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SEGFLOW_")}
    full_env.pop("NOTIFY_SOCKET", None)
    full_env.update({"SEGFLOW_HTTP_LISTEN": f"127.0.0.1:{port}",
                     "SEGFLOW_HTTP_PUBLIC_URL": f"http://127.0.0.1:{port}",
                     "SEGFLOW_HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
                     "SEGFLOW_HTTP_BODY_TIMEOUT": str(BODY_TIMEOUT),
                     "SEGFLOW_HTTP_KEEPALIVE_TIMEOUT": str(KEEPALIVE_TIMEOUT), **env})

    def limit() -> None:  # in the child, before exec
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = folder / "daemon.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "segflowd.cli", "run", "--config", str(config)],
            cwd=folder, env=full_env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=limit)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy_or_log(base, process, log)
        yield base, log
        assert process.poll() is None, "segflowd died:\n" + log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_healthy_or_log(base: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll /healthz until 200; fail with the daemon's log if it exits or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/healthz", timeout=2.0).status_code == 200:
                return
        time.sleep(0.05)
    pytest.fail("segflowd did not become healthy:\n" + log.read_text()[-3000:])


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setblocking(False)
    return s


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def closed_by_server(socks: list[socket.socket], deadline: float) -> dict[int, bytes]:
    """Wait (until ``deadline``) for the server to close each socket; return what each
    received before the close, by index. Sockets still open at the deadline are absent."""
    got: dict[int, bytes] = {}
    data: dict[int, bytes] = {i: b"" for i in range(len(socks))}
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        sel.register(s, selectors.EVENT_READ, i)
    try:
        while len(got) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                i = key.data
                try:
                    chunk = socks[i].recv(65536)
                except BlockingIOError:
                    continue
                except OSError:  # reset: closed too
                    chunk = b""
                if chunk:
                    data[i] += chunk
                    continue
                got[i] = data[i]
                sel.unregister(socks[i])
    finally:
        sel.close()
    return got


class RealClients:
    """A thread making real requests (a new connection each) until stopped."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.statuses: list[int | str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="real-clients", daemon=True)

    def __enter__(self) -> RealClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT + 5)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
                    r = client.post(f"{self.base}/v1/users/real/events",
                                    headers={"Authorization": f"Bearer {API_SECRET}"},
                                    json={"name": "visit", "id": f"real-{n}"})
                self.statuses.append(r.status_code)
            except httpx.HTTPError as exc:
                self.statuses.append(type(exc).__name__)
            self._stop.wait(0.1)


def drip(socks: list[socket.socket], stop: threading.Event) -> None:
    """Slowloris: one more header line on every socket every DRIP_EVERY seconds."""
    n = 0
    while not stop.wait(DRIP_EVERY):
        n += 1
        for s in socks:
            with contextlib.suppress(OSError):  # closed by the server: what we want
                s.send(f"X-Drip-{n}: {n}\r\n".encode())


@pytest.fixture
def many_files() -> Iterator[None]:
    """This process holds ~1,700 sockets: raise its own soft open-files limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4096
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.fail(f"the test needs {need} open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_and_slowloris_sockets_are_closed_and_real_clients_served(
        sqlite_url: str, tmp_path: Path, many_files: None) -> None:
    """1,100 idle sockets, 500 slowloris clients and 100 stalled bodies against a daemon
    with 1,024 open files: every real request meanwhile is answered 202, and every one
    of those sockets is closed by the server within its bound."""
    with daemon(tmp_path / "d", sqlite_url, {}, nofile=NOFILE) as (base, log):
        lowered = log_events(log.read_text(), "http.max_connections_lowered")
        assert lowered, "no http.max_connections_lowered in the log"
        assert lowered[0]["max_connections"] == NOFILE - FD_RESERVE, lowered
        port = port_of(base)
        idle: list[socket.socket] = []
        slow: list[socket.socket] = []
        stalled: list[socket.socket] = []
        stop_drip = threading.Event()
        dripper = threading.Thread(target=drip, args=(slow, stop_drip), daemon=True)
        try:
            with RealClients(base) as real:
                started = time.monotonic()
                for _ in range(IDLE_SOCKETS):
                    idle.append(connect(port))
                for _ in range(SLOWLORIS):
                    s = connect(port)
                    s.send(b"POST /v1/users/x/events HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                    slow.append(s)
                dripper.start()
                for _ in range(STALLED_BODIES):
                    s = connect(port)
                    s.send(b"POST /v1/users/x/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Authorization: Bearer " + API_SECRET.encode() + b"\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                           b'{"name":')
                    stalled.append(s)
                bound = started + max(HEADER_TIMEOUT, BODY_TIMEOUT) + CLOSE_SLACK
                idle_closed = closed_by_server(idle, bound)
                slow_closed = closed_by_server(slow, bound)
                stalled_closed = closed_by_server(stalled, bound)
                time.sleep(1.0)  # real requests after the attack, too
            health = httpx.get(f"{base}/healthz", timeout=REQUEST_TIMEOUT)
        finally:
            stop_drip.set()
            if dripper.is_alive():
                dripper.join(5)
            for s in idle + slow + stalled:
                s.close()

    assert len(idle_closed) == IDLE_SOCKETS, f"{IDLE_SOCKETS - len(idle_closed)} idle open"
    assert all(data == b"" for data in idle_closed.values())  # closed without a word
    assert len(slow_closed) == SLOWLORIS, f"{SLOWLORIS - len(slow_closed)} slowloris open"
    answered = [d for d in slow_closed.values() if d]
    # The slowloris clients not evicted as idle to make room got a 408 before the close.
    assert answered
    assert all(d.startswith(b"HTTP/1.1 408 ") for d in answered)
    assert len(stalled_closed) == STALLED_BODIES
    assert all(d.startswith(b"HTTP/1.1 408 ") for d in stalled_closed.values())
    assert b'"code": "timeout"' in next(iter(stalled_closed.values()))
    assert len(real.statuses) >= 10, real.statuses
    assert set(real.statuses) == {202}, real.statuses
    assert health.status_code == 200


def raw_request(port: int, request: bytes) -> tuple[bytes, socket.socket]:
    """Send ``request`` on a new connection; return the first response's bytes and the
    socket (still open if the server keeps it alive)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT)
    s.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body, s


def responses_until_close(s: socket.socket) -> list[bytes]:
    """Every response on ``s`` until the server closes it (each head and its body)."""
    s.settimeout(REQUEST_TIMEOUT)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
            data += chunk
    s.close()
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        out.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return out


def status_and_error(response: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


def test_header_caps_431_full_house_503_and_idle_keepalive_closed(
        sqlite_url: str, tmp_path: Path) -> None:
    """Headers over max_header_bytes or max_headers: 431 before any handler; with every
    connection running a request, a new one gets 503 with Retry-After and, once those
    time out, service again; a kept-alive connection idle past the bound is closed."""
    env = {"SEGFLOW_HTTP_MAX_CONNECTIONS": "20", "SEGFLOW_HTTP_MAX_HEADER_BYTES": "4096",
           "SEGFLOW_HTTP_MAX_HEADERS": "30"}
    with daemon(tmp_path / "d", sqlite_url, env) as (base, _log):
        port = port_of(base)
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
        response, s = raw_request(port, big)
        s.close()
        status, error = status_and_error(response)
        assert status == 431
        assert error["error"]["code"] == error["code"] == "headers_too_large"  # type: ignore[index]

        # A head over the cap in two pieces, each under it, and one behind a small
        # request in the same chunk (pipelined): both still 431.
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 3000 + b"\r\n")
        time.sleep(0.2)  # a chunk of its own
        s.sendall(b"X-B: " + b"b" * 3000 + b"\r\n\r\n")
        assert [status_and_error(r)[0] for r in responses_until_close(s)] == [431]
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET /healthz HTTP/1.1"
                  b"\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        # (the whole chunk is parsed at once: the connection closes with the 431, maybe
        # before the first request's answer was written)
        assert [status_and_error(r)[0] for r in responses_until_close(s)][-1:] == [431]

        many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
            b"X-H%d: 1\r\n" % i for i in range(40)) + b"\r\n"
        response, s = raw_request(port, many)
        s.close()
        status, error = status_and_error(response)
        assert status == 431
        assert error["error"]["code"] == "too_many_headers"  # type: ignore[index]

        # One header line sent without its end, growing past the cap in small pieces.
        s = connect(port)
        s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        for _ in range(10):
            time.sleep(0.05)
            with contextlib.suppress(OSError):
                s.send(b"b" * 1000)
        closed = closed_by_server([s], time.monotonic() + HEADER_TIMEOUT + CLOSE_SLACK)
        s.close()
        assert list(closed) == [0]
        assert closed[0].startswith(b"HTTP/1.1 431 "), closed

        # A kept-alive connection: answered, then closed once idle past the bound.
        response, s = raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_and_error(response)[0] == 200
        s.setblocking(False)
        closed = closed_by_server([s], time.monotonic() + KEEPALIVE_TIMEOUT + CLOSE_SLACK)
        s.close()
        assert closed == {0: b""}

        # Twenty connections each running a request (their bodies stalled): a full house.
        busy = []
        for _ in range(20):
            b = connect(port)
            b.send(b"POST /v1/users/x/events HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n"
                   b"Authorization: Bearer " + API_SECRET.encode() + b"\r\n\r\n{")
            busy.append(b)
        time.sleep(0.5)  # let the daemon parse their headers
        try:
            response, s = raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            s.close()
            status, error = status_and_error(response)
            assert status == 503
            assert b"retry-after: 1" in response.lower()
            assert error["error"]["code"] == "overloaded"  # type: ignore[index]
            timed_out = closed_by_server(busy, time.monotonic() + BODY_TIMEOUT + CLOSE_SLACK)
            assert len(timed_out) == 20
            assert all(d.startswith(b"HTTP/1.1 408 ") for d in timed_out.values())
        finally:
            for b in busy:
                b.close()
        assert httpx.get(f"{base}/healthz", timeout=REQUEST_TIMEOUT).status_code == 200


@pytest.mark.parametrize(("key", "value", "message"), [
    ("header_timeout", "0", "positive number of seconds"),
    ("body_timeout", "-1", "positive number of seconds"),
    ("keepalive_timeout", "nan", "positive number of seconds"),
    ("max_connections", "0", "at least 1"),
    ("max_header_bytes", "100", "at least 1024"),
    ("max_headers", "2", "at least 8"),
])
def test_http_limits_config_errors_name_the_key(tmp_path: Path, key: str, value: str,
                                                message: str) -> None:
    """A limit that makes no sense is refused with the file, key and line."""
    path = tmp_path / "segflow.toml"
    path.write_text(f'[daemon]\napp = "app.py:app"\n[http]\n{key} = {value}\n',
                    encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.key == f"http.{key}"
    assert caught.value.line == 4
    assert message in str(caught.value)


def test_http_limits_have_documented_defaults(tmp_path: Path) -> None:
    path = tmp_path / "segflow.toml"
    path.write_text('[daemon]\napp = "app.py:app"\n', encoding="utf-8")
    h = load_config(path, {}).http
    assert (h.header_timeout, h.body_timeout, h.keepalive_timeout) == (10.0, 30.0, 5.0)
    assert (h.max_connections, h.max_header_bytes, h.max_headers) == (1000, 16384, 100)
