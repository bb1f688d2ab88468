"""Fault fixtures: ``start_daemon`` (the acceptance harness, reused), ``sink`` (an SMTP
server of the test's own) and ``private_mariadb`` (a mariadbd the test may stop).

``private_mariadb`` never touches the shared server on :3306: it installs a fresh
datadir under ``tmp_path`` and runs mariadbd on a free port. Without mariadbd or
mariadb-install-db the test skips with the reason; under ``CI=true`` it fails instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The acceptance harness is a top-level module of tests/acceptance (no packages here).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "acceptance"))

from daemon_harness import start_daemon
from fault_harness import sink

from segflowd.testing import PrivateMariaDB

__all__ = ["private_mariadb", "sink", "start_daemon"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def private_mariadb(tmp_path: Path) -> Iterator[PrivateMariaDB]:
    """A running mariadbd of this test's own, with an empty database ``test``."""
    if not PrivateMariaDB.available():
        message = "mariadbd and mariadb-install-db are needed for a private MariaDB server"
        if IN_CI:
            pytest.fail(f"{message}, and CI=true requires it")
        pytest.skip(message)
    server = PrivateMariaDB(tmp_path / "mariadb")
    server.install()
    server.start()
    try:
        yield server
    finally:
        server.stop()
