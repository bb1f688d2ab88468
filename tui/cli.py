"""``segflow-tui [--socket PATH | --config PATH] [--wait]``: find the socket, probe it, run.

A missing socket or a permission error at start is one sentence on stderr (exit 1),
unless ``--wait``; a bad config exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from segflowd import __version__
from segflowd.control.client import ControlClient, resolve_socket
from segflowd.errors import ConfigError, ControlUnavailable

from .app import SegflowTUI
from .backend import SocketBackend

__all__ = ["run"]


def run(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segflow-tui",
                                description="watch and steer a running segflowd")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="the daemon's control socket")
    where.add_argument("--config", "-c", metavar="PATH",
                       help="segflow.toml, to find [daemon] control_socket")
    p.add_argument("--wait", action="store_true",
                   help="start even if the daemon is not up yet, and wait for it")
    p.add_argument("--version", action="version", version=f"segflow-tui {__version__}")
    args = p.parse_args(argv)
    try:
        path = resolve_socket(args.socket, args.config)
    except ConfigError as exc:
        print(f"segflow-tui: {exc}", file=sys.stderr)
        return 2
    if not args.wait:
        async def probe() -> None:
            client = await ControlClient.connect(path)
            await client.aclose()

        try:
            anyio.run(probe)
        except ControlUnavailable as exc:
            print(f"segflow-tui: {exc}", file=sys.stderr)
            return 1
    SegflowTUI(SocketBackend(path)).run()
    return 0
