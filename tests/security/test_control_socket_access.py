"""The control socket of a running segflowd is the daemon user's alone.

The daemon runs as a process with its socket in a folder anyone may enter, so only the
socket's own mode stands between another user and the admin commands: it is a socket,
mode 0600, owned by the daemon's user, and a process running as ``nobody`` is refused
(PermissionError). As a control, the same process connects once the mode allows it,
so the refusal is the mode's doing. Switching users needs root: elsewhere the
cross-user part is skipped (and fails under CI, which must run it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import StartDaemon

pytestmark = pytest.mark.slow

NOBODY = 65534  # uid and gid of "nobody"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CONNECTED, REFUSED, OTHER = 0, 13, 99  # exit statuses of the probe child


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A short folder everybody may enter (0755), so only the socket's mode protects it."""
    folder = Path(tempfile.mkdtemp(prefix="sfs", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def connect_as(uid: int, gid: int, path: Path) -> int:
    """In a forked child that drops to ``uid``/``gid``: connect and read the hello."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child
        pid = os.fork()  # only makes syscalls and _exits, so no lock can be held
    if pid == 0:  # pragma: no cover - runs in the child
        code = OTHER
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(path))
                code = CONNECTED if s.recv(100).startswith(b'{"hello"') else OTHER
        except PermissionError:
            code = REFUSED
        except BaseException:
            code = OTHER
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_the_socket_is_0600_owned_by_the_daemon_user_and_refuses_other_users(
        start_daemon: StartDaemon, sqlite_url: str, open_folder: Path) -> None:
    path = open_folder / "ctl.sock"
    d = start_daemon(store_url=sqlite_url,
                     env={"SEGFLOW_DAEMON_CONTROL_SOCKET": str(path)})
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    daemon_uid = os.stat(f"/proc/{d.process.pid}").st_uid
    assert st.st_uid == daemon_uid
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as own:  # its own user gets in
        own.settimeout(10)
        own.connect(str(path))
        assert own.recv(100).startswith(b'{"hello"')

    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("CI must run this test as root: it switches to the user nobody")
        pytest.skip("switching to another user (nobody) needs root")
    assert connect_as(NOBODY, NOBODY, path) == REFUSED
    assert connect_as(NOBODY, st.st_gid, path) == REFUSED  # the daemon's group: still no
    path.chmod(0o666)  # the control: with the mode open, the same probe gets in
    assert connect_as(NOBODY, NOBODY, path) == CONNECTED
    assert d.process.poll() is None
