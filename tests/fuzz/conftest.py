"""Fuzz fixtures: the acceptance harness's ``start_daemon`` and the in-process daemon.

The helpers of tests/acceptance (``daemon_harness``) and tests/integration
(``control_harness``) are put on ``sys.path`` here, so this folder runs on its own too.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent
for _folder in ("acceptance", "integration"):
    if str(_TESTS / _folder) not in sys.path:
        sys.path.insert(0, str(_TESTS / _folder))

from daemon_harness import start_daemon  # noqa: E402 - importable only after the path is set

__all__ = ["start_daemon"]
