"""The commands as processes whose reader has gone (``segflowd status | head -1``): they
end quietly with status 0, no BrokenPipe traceback; and ``segflow-tui --version``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from control_harness import make_config, running_daemon, short_tmp

from segflowd import __version__

pytestmark = pytest.mark.anyio

BIN = Path(sys.executable).parent


@pytest.fixture
def folder() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


async def into_closed_pipe(*argv: str) -> tuple[int, str]:
    """Run ``argv`` with stdout a pipe whose reading end is already closed: its first
    write fails with EPIPE, as under ``| head -1`` once head has its line and exits."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = await anyio.run_process(list(argv), stdout=write_end, stderr=subprocess.PIPE,
                                       check=False)
    finally:
        os.close(write_end)
    return done.returncode, done.stderr.decode()


async def test_version_into_a_closed_pipe_exits_quietly() -> None:
    for argv in ([str(BIN / "segflowd"), "version"],
                 [sys.executable, "-m", "segflowd", "version"],
                 [sys.executable, "-m", "segflowd.cli", "version"]):
        code, err = await into_closed_pipe(*argv)
        assert (code, err) == (0, ""), argv


@pytest.mark.parametrize("args", [["status"], ["status", "--json"]])
async def test_control_commands_into_a_closed_pipe_exit_quietly(
        sqlite_url: str, folder: Path, args: list[str]) -> None:
    config = make_config(folder, sqlite_url)
    async with running_daemon(config):
        code, err = await into_closed_pipe(str(BIN / "segflowd"), *args,
                                           "--socket", str(config.daemon.control_socket))
    assert "Traceback" not in err
    assert "BrokenPipe" not in err
    assert (code, err) == (0, "")


async def test_status_piped_into_head_prints_its_first_line(
        sqlite_url: str, folder: Path) -> None:
    """The shell's own pipeline, with pipefail: head's line, and no failure from segflowd."""
    config = make_config(folder, sqlite_url)
    async with running_daemon(config):
        done = await anyio.run_process(
            ["bash", "-o", "pipefail", "-c",
             f'"{BIN / "segflowd"}" status --socket "$1" | head -1', "sh",
             str(config.daemon.control_socket)], check=False)
    assert done.returncode == 0
    assert done.stderr == b""
    assert done.stdout.decode().startswith(f"segflowd {__version__} (control protocol 1)")
    assert done.stdout.count(b"\n") == 1


async def test_tui_version_prints_the_version_and_exits_0() -> None:
    done = await anyio.run_process([str(BIN / "segflow-tui"), "--version"], check=False)
    assert done.returncode == 0
    assert done.stdout.decode() == f"segflow-tui {__version__}\n"
