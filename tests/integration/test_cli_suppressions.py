"""``segflowd suppressions list|remove|export`` run as the real command on a real store
(SQLite and MariaDB): every row with its reason, source and time; removal; clear errors."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from segflowd.schema import suppressions
from segflowd.store import Store

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2026, 3, 1, 9, 30)
ROWS = [  # address, reason, source, detail, added
    ("ann@example.org", "bounce:550 5.1.1", "mail",
     "smtp 550 5.1.1 at RCPT TO: <ann@example.org>: user unknown", T0),
    ("bob@example.org", "bounce:HardBounce", "postmark",
     'HardBounce: "no such user", said the server\nline two', T0 + dt.timedelta(hours=1)),
    ("cy@example.org", "complaint", "postmark", "spam complaint", T0 + dt.timedelta(hours=2)),
    ("dee@example.org", "manual", "operator", None, T0 + dt.timedelta(hours=3)),
]


def write_config(folder: Path, url: str) -> Path:
    config = folder / "segflow.toml"
    config.write_text(f'[daemon]\napp = "app.py:app"\n[store]\nurl = "{url}"\n'
                      "connect_timeout = 1\n", encoding="utf-8")
    return config


def segflowd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segflowd.cli", "suppressions", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
async def config(store: Store, store_url: str, tmp_path: Path) -> Path:
    async with store.begin() as conn:
        for address, reason, source, detail, added in ROWS:
            await conn.execute(sa.insert(suppressions).values(
                address=address, reason=reason, source=source, detail=detail,
                created_at=added))
    return write_config(tmp_path, store_url)


async def addresses(store: Store) -> list[str]:
    async with store.connect() as conn:
        return sorted((await conn.execute(sa.select(suppressions.c.address))).scalars())


async def test_list_prints_every_row_newest_first_with_reason_source_and_time(
        config: Path) -> None:
    done = segflowd(config, "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["address", "reason", "source", "created_at", "detail"]
    assert [line.split()[0] for line in lines[2:-1]] == [
        "dee@example.org", "cy@example.org", "bob@example.org", "ann@example.org"]
    assert lines[-2].split()[:5] == ["ann@example.org", "bounce:550", "5.1.1", "mail",
                                     "2026-03-01T09:30:00+00:00"]
    assert lines[-1] == "4 suppressed addresses"
    as_json = [json.loads(line) for line in segflowd(config, "list", "--json").stdout.split(
        "\n") if line]
    assert as_json[-1] == {"address": "ann@example.org", "reason": "bounce:550 5.1.1",
                           "source": "mail", "created_at": "2026-03-01T09:30:00+00:00",
                           "detail": "smtp 550 5.1.1 at RCPT TO: <ann@example.org>: "
                                     "user unknown"}
    assert as_json[0]["detail"] == ""  # no detail: an empty string, not "None"


async def test_list_filters_by_reason_kind_and_source(config: Path) -> None:
    def listed(*args: str) -> list[str]:
        done = segflowd(config, "list", "--json", *args)
        assert done.returncode == 0, done.stderr
        return [json.loads(line)["address"] for line in done.stdout.splitlines()]

    assert listed("--reason", "bounce") == ["bob@example.org", "ann@example.org"]
    assert listed("--reason", "bounce:HardBounce") == ["bob@example.org"]
    assert listed("--source", "postmark") == ["cy@example.org", "bob@example.org"]
    assert listed("--reason", "bounce%") == []  # a pattern character is only a character


async def test_export_writes_csv_to_stdout_or_a_file(config: Path, tmp_path: Path) -> None:
    done = segflowd(config, "export")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout, newline="")))
    assert [r["address"] for r in rows] == [
        "dee@example.org", "cy@example.org", "bob@example.org", "ann@example.org"]
    assert rows[2] == {"address": "bob@example.org", "reason": "bounce:HardBounce",
                       "source": "postmark", "created_at": "2026-03-01T10:30:00+00:00",
                       "detail": 'HardBounce: "no such user", said the server\nline two'}
    out = tmp_path / "suppressions.csv"
    done = segflowd(config, "export", "--out", str(out), "--reason", "complaint")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"1 suppressed address written to {out}"
    with out.open(newline="", encoding="utf-8") as f:
        assert [(r["address"], r["reason"]) for r in csv.DictReader(f)] == [
            ("cy@example.org", "complaint")]


async def test_remove_takes_the_address_off_and_an_unknown_one_is_a_one_line_error(
        config: Path, store: Store) -> None:
    done = segflowd(config, "remove", "  Bob@Example.ORG ")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("removed bob@example.org (was: bounce:HardBounce, "
                                  "source postmark, since 2026-03-01T10:30:00+00:00)")
    assert await addresses(store) == ["ann@example.org", "cy@example.org", "dee@example.org"]
    again = segflowd(config, "remove", "bob@example.org")
    assert again.returncode == 1
    assert again.stderr == "segflowd: bob@example.org is not on the suppression list\n"
    assert await addresses(store) == ["ann@example.org", "cy@example.org", "dee@example.org"]


def test_a_missing_sqlite_store_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "nowhere" / "segflow.db"
    config = write_config(tmp_path, f"sqlite+aiosqlite:///{db}")
    done = segflowd(config, "list")
    assert done.returncode == 1
    assert done.stderr.startswith("segflowd: store sqlite+aiosqlite:///")
    assert "no such database file" in done.stderr
    assert not db.exists()


def test_an_empty_store_has_no_suppressions(tmp_path: Path) -> None:
    db = tmp_path / "segflow.db"
    db.touch()  # a store the daemon has not created its tables in yet
    config = write_config(tmp_path, f"sqlite+aiosqlite:///{db}")
    done = segflowd(config, "list")
    assert (done.returncode, done.stdout) == (0, "(no suppressed addresses)\n")
    done = segflowd(config, "remove", "ann@example.org")
    assert done.returncode == 1
    assert "ann@example.org is not on the suppression list" in done.stderr


def test_an_unreachable_store_and_a_bad_config_are_one_line_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, "mysql+aiomysql://root@127.0.0.1:1/segflow")
    done = segflowd(config, "list")
    assert done.returncode == 1
    assert done.stderr.startswith("segflowd: store mysql+aiomysql://root@127.0.0.1:1/segflow "
                                  "is unreachable: ")
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
    (tmp_path / "segflow.toml").write_text("[store\n", encoding="utf-8")
    done = segflowd(config, "list")
    assert done.returncode == 2
    assert "segflow.toml" in done.stderr
    assert "Traceback" not in done.stderr
