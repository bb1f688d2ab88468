"""Acceptance fixtures: ``start_daemon`` runs segflowd as a process (see daemon_harness)."""

from __future__ import annotations

from daemon_harness import start_daemon

__all__ = ["start_daemon"]
