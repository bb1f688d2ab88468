"""``segflowd status`` and the admin subcommands against a running daemon."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import anyio
import pytest
from control_harness import make_config, running_daemon, short_tmp

from segflowd.cli.commands import main

pytestmark = pytest.mark.anyio


@pytest.fixture
def folder() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


async def cli(*argv: str) -> int:
    return await anyio.to_thread.run_sync(main, list(argv))


async def test_status_prints_a_summary_and_json_with_the_same_facts(
        sqlite_url: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(folder, sqlite_url)
    sock = str(config.daemon.control_socket)
    async with running_daemon(config):
        capsys.readouterr()  # the daemon's start-up log lines
        human = await cli("status", "--socket", sock)
        text = capsys.readouterr().out
        as_json = await cli("status", "--socket", sock, "--json")
        data = json.loads(capsys.readouterr().out)
    assert (human, as_json) == (0, 0)
    assert text.startswith("segflowd 0.1.0 (control protocol 1), up ")
    assert "store:  sqlite, healthy" in text
    assert "control: path=" in text
    assert data["store"]["healthy"] is True


async def test_admin_subcommands_call_their_actions_with_typed_args(
        sqlite_url: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[str, Mapping[str, object]]] = []

    def recorder(name: str):  # type: ignore[no-untyped-def]
        async def action(args: Mapping[str, object]) -> object:
            calls.append((name, dict(args)))
            return {"message": 1, "status": "sent"} if name == "email.test" else None
        return action

    names = ["campaign.pause", "segment.refresh", "email.test", "message.retry",
             "instance.restart", "broadcast.launch"]
    config = make_config(folder, sqlite_url)
    sock = str(config.daemon.control_socket)
    async with running_daemon(config, actions={n: recorder(n) for n in names}):
        codes = [
            await cli("pause", "welcome", "--socket", sock),
            await cli("refresh", "active", "--socket", sock),
            await cli("test-email", "welcome_1", "a@example.com", "--user", "u1",
                      "--socket", sock),
            await cli("retry", "42", "--socket", sock),
            await cli("restart", "7", "--socket", sock),
            await cli("broadcast", "trial", "--template", "spring", "--rate", "5",
                      "--name", "spring-sale", "--arg", "x=y", "--socket", sock),
        ]
        capsys.readouterr()
        missing = await cli("terminate", "7", "--socket", sock)
        err = capsys.readouterr().err
    assert codes == [0] * 6
    assert calls == [
        ("campaign.pause", {"campaign": "welcome"}),
        ("segment.refresh", {"segment": "active"}),
        ("email.test", {"template": "welcome_1", "to": "a@example.com", "user": "u1"}),
        ("message.retry", {"message": 42}),
        ("instance.restart", {"instance": 7}),
        ("broadcast.launch", {"segment": "trial", "template": "spring", "rate": 5.0,
                              "broadcast": "spring-sale", "x": "y"}),
    ]
    assert missing == 1
    assert err == "segflowd: instance.terminate is not available in this daemon\n"


def test_status_without_a_daemon_is_one_sentence_and_exit_1(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "--socket", str(folder / "none.sock")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert "is segflowd running?" in err
