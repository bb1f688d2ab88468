"""The segflowd command line: where --config may go, and the default command."""

from __future__ import annotations

import pytest

from segflowd import __version__
from segflowd.cli.commands import _parser, main


@pytest.mark.parametrize(("argv", "command", "config"), [
    ([], "run", None),
    (["--config", "a.toml"], "run", "a.toml"),
    (["-c", "a.toml", "check"], "check", "a.toml"),
    (["check", "--config", "b.toml"], "check", "b.toml"),
    (["--config", "a.toml", "migrate", "--config", "b.toml"], "migrate", "b.toml"),
    (["run"], "run", None),
])
def test_config_is_accepted_before_or_after_the_command(argv: list[str], command: str,
                                                         config: str | None) -> None:
    args = _parser().parse_args(argv)
    assert args.command == command
    assert args.config == config


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"segflowd {__version__}"


def test_missing_config_exits_2_with_one_line(tmp_path: object,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", f"{tmp_path}/none.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("segflowd: ")
    assert "configuration file not found" in err[0]
