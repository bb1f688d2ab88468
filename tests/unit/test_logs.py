"""Logging: JSON lines when stdout is not a terminal, console text when asked."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from segflowd.logs import configure_logging

pytestmark = pytest.mark.usefixtures("restore_logging")  # configure_logging is global


def test_auto_format_writes_json_lines_when_stdout_is_not_a_tty(
        capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("auto", "info")
    with structlog.contextvars.bound_contextvars(campaign="onboarding"):
        structlog.get_logger("segflowd.test").info("flow.step", user_id="u1")
    logging.getLogger("uvicorn.error").warning("plain %s", "stdlib")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["event"] == "flow.step"
    assert lines[0]["user_id"] == "u1"
    assert lines[0]["campaign"] == "onboarding"  # bound through contextvars
    assert lines[0]["level"] == "info"
    assert lines[0]["timestamp"].endswith("Z")
    assert lines[1]["event"] == "plain stdlib"
    assert lines[1]["logger"] == "uvicorn.error"


def test_level_filters_and_console_format_is_not_json(
        capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", "warning")
    log = structlog.get_logger("segflowd.test2")
    log.info("store.migrated")
    log.warning("store.unreachable", attempt=1)
    out = capsys.readouterr().out
    assert "store.migrated" not in out
    assert "store.unreachable" in out
    assert not out.lstrip().startswith("{")


def test_asyncmy_server_warnings_are_not_logged(capsys: pytest.CaptureFixture[str]) -> None:
    """INSERT IGNORE duplicates are expected; asyncmy would log each one at WARNING."""
    configure_logging("json", "info")
    logging.getLogger("asyncmy").warning("Duplicate entry 'u1' for key 'PRIMARY'")
    logging.getLogger("asyncmy").error("real trouble")
    out = capsys.readouterr().out
    assert "Duplicate entry" not in out
    assert "real trouble" in out
