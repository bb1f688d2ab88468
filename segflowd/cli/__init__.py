"""The ``segflowd`` command: run, migrate, check, preview, discover and the admin commands."""

from __future__ import annotations

from .commands import main

__all__ = ["main"]
