"""``segflowd check`` and data sources: a data source naming an unconfigured source is a
problem; a source whose role could write (or is a superuser) is a warning."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog

from segflowd.cli.commands import main

APP = """\
from segflowd import Segflow
app = Segflow(__file__)
app.data_source("members", source="crm",
                audience="SELECT 'u1' AS profile_id, 'a@example.com' AS email")
"""


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """cli.main configures logging for the process; put it back for the next test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


def _config(tmp_path: Path, store_url: str, sources: str, app: str = APP) -> str:
    (tmp_path / "flows.py").write_text(app)
    config = tmp_path / "segflow.toml"
    config.write_text(f"""
[daemon]
app = "flows.py:app"
[store]
url = "{store_url}"
connect_timeout = 1
{sources}
""")
    return str(config)


def test_check_warns_that_a_superuser_source_is_no_read_only_boundary(
        tmp_path: Path, sqlite_url: str, postgres_url: str, mariadb_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, sqlite_url, f"""
[sources.crm]
url = "{postgres_url}"
[sources.shop]
url = "{mariadb_url}"
""")
    assert main(["check", "--config", config]) == 0  # a warning, not a problem
    out = capsys.readouterr().out
    assert "warning: source 'crm'" in out
    assert "the role is a superuser" in out
    assert "warning: source 'shop'" in out


def test_check_is_quiet_about_a_select_only_role(
        tmp_path: Path, sqlite_url: str, postgres_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    url = sa.engine.make_url(postgres_url)
    admin = sa.create_engine(url.set(drivername="postgresql+psycopg2"),
                             poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    role = f"reader_{url.database}"
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (a integer)")
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'GRANT SELECT ON t TO "{role}"')
    try:
        reader = url.set(username=role).render_as_string(hide_password=False)
        config = _config(tmp_path, sqlite_url, f'[sources.crm]\nurl = "{reader}"\n')
        assert main(["check", "--config", config]) == 0
        out = capsys.readouterr().out
        assert "source 'crm'" not in out
        with admin.connect() as conn:
            conn.exec_driver_sql(f'GRANT INSERT ON t TO "{role}"')
        assert main(["check", "--config", config]) == 0
        assert "the role can write to tables" in capsys.readouterr().out
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
            conn.exec_driver_sql(f'DROP ROLE "{role}"')
        admin.dispose()


def test_check_reports_a_data_source_naming_an_unconfigured_source(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, sqlite_url, "")
    assert main(["check", "--config", config]) == 1
    assert "names source 'crm', which is not configured" in capsys.readouterr().out
