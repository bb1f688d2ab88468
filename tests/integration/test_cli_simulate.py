"""``segflowd simulate``: the example app's scenario as a table; bad input as one line."""

from __future__ import annotations

import email
import email.policy
import textwrap
from pathlib import Path

import pytest

from segflowd.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "segflow.toml")  # the example app; its store is never touched
ANN = '{"email": "ann@example.com", "name": "Ann"}'


def simulate(*args: str) -> int:
    return main(["simulate", "--config", CONFIG, "--start", "2026-03-01T09:00:00Z", *args])


def test_prints_the_timeline_as_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = simulate("--user", "ann", ANN, "--event", "ann", "login", "2026-01-01T00:00:00Z",
                    "--days", "40", "--campaign", "winback")
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "USER", "WHAT", "TEMPLATE", "SUBJECT"]
    sends = [line for line in lines if "message.sent" in line]
    assert [line.split()[0] for line in sends] == ["+0d", "+1d", "+3d"]
    assert all("we-miss-you" in line and "We miss you, Ann" in line for line in sends)
    assert "welcome" not in out  # --campaign winback leaves onboarding out
    assert lines[-1] == f"{len(lines) - 2} events, 3 messages sent"  # of winback


def test_a_later_event_waits_for_its_time(capsys: pytest.CaptureFixture[str]) -> None:
    code = simulate("--user", "ann", ANN, "--event", "ann", "login", "2026-01-01T00:00:00Z",
                    "--event", "ann", "login", "2026-03-03T09:00:00Z", "--days", "10",
                    "--campaign", "winback")
    out = capsys.readouterr().out
    assert code == 0
    exited = [line for line in out.splitlines() if "flow.exited" in line]
    assert len(exited) == 1
    assert exited[0].startswith("+2d 00:00:00")
    assert len([line for line in out.splitlines() if "message.sent" in line]) == 2


def test_out_writes_each_message_as_eml(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = simulate("--user", "ann", ANN, "--event", "ann", "reset_password_requested",
                    '{"token": "abc"}', "--hours", "1", "--out", str(tmp_path))
    assert code == 0
    files = sorted(tmp_path.glob("*.eml"))
    assert [f.name for f in files] == ["001-ann-welcome.eml", "002-ann-password-reset.eml"]
    msg = email.message_from_bytes(files[1].read_bytes(), policy=email.policy.default)
    assert msg["Subject"] == "Reset your password"
    assert msg["To"] == "ann@example.com"
    assert f"wrote {files[0]}" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--user", "ann", "{oops"], "segflowd: --user ann: not valid JSON"),
    (["--user", "ann", "[1]"], "segflowd: --user ann: must be a JSON object"),
    (["--user", "ann", ANN, "--event", "bob", "login"],
     "segflowd: --event bob login: unknown user 'bob'"),
    (["--user", "ann", ANN, "--event", "ann", "login", "2026-02-30T00:00:00Z"],
     "segflowd: --event ann login: not an ISO 8601 time"),
    (["--user", "ann", ANN, "--event", "ann", "login", "{"],
     "segflowd: --event ann login: not valid JSON"),
    (["--campaign", "nope"], "segflowd: --campaign: unknown campaign 'nope'"),
    (["--start", "soon"], "segflowd: --start: not an ISO 8601 time"),
])
def test_bad_input_is_one_line_naming_the_argument(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--config", CONFIG, *args])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err


def test_an_app_that_fails_to_load_gets_the_problems_check_reports(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "app.py").write_text("from segflowd import Segflow\napp = Segflow()\n1 / 0\n")
    cfg = tmp_path / "segflow.toml"
    cfg.write_text(textwrap.dedent("""\
        [daemon]
        app = "app.py"
        [store]
        url = "sqlite+aiosqlite:///store.db"
        """))
    assert main(["check", "--config", str(cfg)]) == 1
    checked = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("problem:")]
    assert main(["simulate", "--config", str(cfg), "--days", "1"]) == 2
    out = capsys.readouterr().out
    assert checked == [line for line in out.splitlines() if line.startswith("problem:")]
    assert "ZeroDivisionError" in checked[0]
    assert "nothing was simulated" in out
