"""The ``segflowd`` command: run, migrate, check, preview, discover and the admin commands."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from . import commands

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status.

    A reader that goes away (``segflowd status | head -1``) ends the output quietly with
    status 0, as if it had all been read: the command's work is done by then, and a
    traceback about the pipe would only hide the lines the reader did want."""
    try:
        try:
            return commands.main(argv)
        finally:
            sys.stdout.flush()  # in here, not at exit, where the error cannot be caught
    except BrokenPipeError:
        _stdout_to_devnull()
        return commands.EXIT_OK
    except BaseExceptionGroup as group:  # a print inside a task group (anyio)
        if group.split(BrokenPipeError)[1] is not None:
            raise
        _stdout_to_devnull()
        return commands.EXIT_OK


def _stdout_to_devnull() -> None:
    """Point fd 1 at /dev/null, so the interpreter's last flush of what is still buffered
    does not fail again (and print "Exception ignored ... BrokenPipeError")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
