"""``segflowd discover``: a data source's discovery and audience queries run straight on
the real PostgreSQL customer database, printed as a table or JSON lines; clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from customer_db import AUDIENCE, DISCOVERY, PRELOAD, seed_postgres

APP = f'''
from segflowd import Segflow

app = Segflow()
app.data_source("communities", source="crm", discovery={DISCOVERY!r},
                audience={AUDIENCE!r}, preload={PRELOAD!r})
'''


def write(folder: Path, url: str) -> Path:
    (folder / "app.py").write_text(APP, encoding="utf-8")
    config = folder / "segflow.toml"
    config.write_text(f'[daemon]\napp = "app.py:app"\n[sources.crm]\nurl = "{url}"\n'
                      "connect_timeout = 1\n", encoding="utf-8")
    return config


def discover(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segflowd.cli", "discover", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def config(postgres_url: str, tmp_path: Path) -> Path:
    seed_postgres(postgres_url)
    return write(tmp_path, postgres_url.replace("postgresql+asyncpg://", "postgresql://"))


def test_discover_prints_the_active_communities_as_a_table(config: Path) -> None:
    done = discover(config, "communities")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["id", "community_name", "user_count", "plan_type"]
    assert [line.split()[1] for line in lines[2:]] == ["Gardeners", "Cyclists"]  # by size


def test_discover_audience_as_json_lines_binds_the_chosen_values(config: Path) -> None:
    done = discover(config, "communities", "--audience", "community_id=1", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    # cy has no email: the audience query leaves them out, as written
    assert sorted(r["profile_id"] for r in rows) == ["u-ada", "u-bob"]
    assert {r["email"] for r in rows} == {"ada@example.com", "bob@example.com"}


def test_discover_unknown_data_source_is_a_usage_error_listing_the_known(
        config: Path) -> None:
    done = discover(config, "nope")
    assert done.returncode == 2
    assert "no data source 'nope'" in done.stderr
    assert "communities" in done.stderr
    assert "Traceback" not in done.stderr


def test_discover_on_an_unreachable_source_names_it_and_exits_1(tmp_path: Path) -> None:
    config = write(tmp_path, "postgresql://postgres@127.0.0.1:1/nowhere")
    done = discover(config, "communities")
    assert done.returncode == 1
    assert "data source 'crm'" in done.stderr
    assert "unreachable" in done.stderr
    assert "Traceback" not in done.stderr
