"""``segflowd check`` and ``segflowd migrate`` against real stores: exit codes, problems."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from segflowd import schema
from segflowd.cli.commands import main

APP = """\
from sqlalchemy import select
from segflowd import Segflow
from segflowd.schema import users

app = Segflow(templates="templates")

@app.segment("everyone")
def everyone():
    return select(users.c.id)

app.segment("spenders", sql="SELECT user_id AS id FROM events WHERE name = 'purchase'")

@app.campaign("hello", segments=["everyone"])
def hello(ctx, rt):
    yield rt.send_email("welcome")

app.template("welcome", subject="Hi {{ user.name }}", html="welcome.html")
"""


pytestmark = pytest.mark.usefixtures("restore_logging")  # cli.main configures logging


def make(tmp_path: Path, store_url: str, app: str = APP, template: str = "<p>{{ user.name }}</p>",
         ) -> Path:
    (tmp_path / "templates").mkdir(exist_ok=True)
    (tmp_path / "templates" / "welcome.html").write_text(template)
    (tmp_path / "flows.py").write_text(app)
    config = tmp_path / "segflow.toml"
    config.write_text(f"""
[daemon]
app = "flows.py:app"
[store]
url = "{store_url}"
connect_timeout = 1
[providers.outbox]
plugin = "outbox"
path = "var/outbox"
""")
    return config


def test_check_passes_on_a_good_app_and_leaves_an_empty_store_empty(
        tmp_path: Path, store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = make(tmp_path, store_url)
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "app: 2 segments, 1 campaigns, 1 templates, 0 transactions" in out
    assert "empty; it will be created at start" in out
    assert out.strip().endswith("check: ok")
    # check never migrates: a second run still finds the store empty
    assert main(["check", "--config", str(config)]) == 0
    assert "empty; it will be created" in capsys.readouterr().out


def test_check_reports_broken_segment_sql_by_name_with_the_database_message(
        tmp_path: Path, store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = make(tmp_path, store_url, APP.replace("FROM events WHERE", "FROM evnts WHERE"))
    assert main(["migrate", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    problem = next(line for line in out.splitlines() if "spenders" in line)
    assert problem.startswith(f"problem: {tmp_path / 'flows.py'}:11: segment 'spenders' fails")
    assert "evnts" in problem  # the database's own message names the missing table
    assert out.strip().endswith("check: 1 problem")


def test_check_reports_a_template_that_fails_to_render(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = make(tmp_path, sqlite_url, template="<p>{{ user.name | nosuchfilter }}</p>")
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "welcome" in out
    assert "nosuchfilter" in out
    assert "check: 1 problem" in out


def test_check_lists_every_cross_reference_problem(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    app = APP.replace('segments=["everyone"]', 'segments=["nobody"]') + \
        'app.transaction("reset", event="reset", template="gone")\n'
    config = make(tmp_path, sqlite_url, app)
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "campaign 'hello' names unknown segment 'nobody'" in out
    assert "transaction 'reset' names unknown template 'gone'" in out
    assert "check: 2 problems" in out


def test_check_with_a_bad_config_exits_2(tmp_path: Path, sqlite_url: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = make(tmp_path, sqlite_url)
    config.write_text(config.read_text() + "\n[store.extra]\n")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segflowd: {config}")
    assert "store.extra" in err


def test_check_with_an_unloadable_app_exits_1_naming_the_line(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = make(tmp_path, sqlite_url, APP + "\nundefined_name\n")
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'flows.py'}:19: NameError" in out


def test_check_reports_a_schema_newer_than_known(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "s.db"
    config = make(tmp_path, f"sqlite+aiosqlite:///{db}")
    assert main(["migrate", "--config", str(config)]) == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE segflow_schema SET version = 77")
    capsys.readouterr()
    assert main(["check", "--config", str(config)]) == 1
    assert "schema version 77 is newer than this segflowd knows" in capsys.readouterr().out


def test_check_reports_an_unreachable_store(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = make(tmp_path, f"mysql+aiomysql://u:pw@127.0.0.1:{port}/x")
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "is unreachable" in out
    assert ":pw@" not in out


def test_run_with_an_app_error_exits_2(tmp_path: Path, sqlite_url: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = make(tmp_path, sqlite_url, APP.replace('segments=["everyone"]', 'segments=["x"]'))
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "campaign 'hello' names unknown segment 'x'" in err
    assert "Traceback" not in err


def test_migrate_creates_the_schema_and_reports_versions(
        tmp_path: Path, store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = make(tmp_path, store_url)
    assert main(["migrate", "--config", str(config)]) == 0
    assert f"schema version 0 -> {schema.SCHEMA_VERSION}" in capsys.readouterr().out
    assert main(["migrate", "--config", str(config)]) == 0
    assert (f"schema version {schema.SCHEMA_VERSION} -> {schema.SCHEMA_VERSION}"
            in capsys.readouterr().out)


def test_segflowd_without_config_uses_segflow_toml_in_the_working_directory(
        tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    make(tmp_path, sqlite_url)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEGFLOW_CONFIG", raising=False)
    assert main(["check"]) == 0
    assert "check: ok" in capsys.readouterr().out


def test_check_renders_transaction_templates_with_an_event_shaped_like_the_real_one(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = make(tmp_path, sqlite_url,
                  template="<a href='/r?t={{ event.attributes.token | urlencode }}'>reset</a>")
    assert main(["check", "--config", str(config)]) == 0
    assert "check: ok" in capsys.readouterr().out


def test_example_app_and_repository_config_pass_check(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    config = tmp_path / "segflow.toml"
    # the repository's config, but with its store in tmp_path (relative paths follow it)
    text = (root / "segflow.toml").read_text().replace(
        '"examples/saas/flows.py:app"', f'"{root}/examples/saas/flows.py:app"')
    config.write_text(text)
    assert main(["check", "--config", str(config)]) == 0
    assert "check: ok" in capsys.readouterr().out


def test_migrate_against_an_unreachable_store_is_one_line_exit_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = make(tmp_path, f"mysql+aiomysql://u:pw@127.0.0.1:{port}/x")
    assert main(["migrate", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"segflowd: store mysql+aiomysql://u:***@127.0.0.1:{port}/x: ")
