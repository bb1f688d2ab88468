"""``segflowd check`` and data sources: a data source naming an unconfigured source is a
problem; a source whose role could write (or is a superuser) is a warning."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from customer_db import AUDIENCE, DISCOVERY, PRELOAD, PREMIUM, seed_postgres

from segflowd.cli.commands import main

APP = """\
from segflowd import Segflow
app = Segflow(__file__)
app.data_source("members", source="crm",
                audience="SELECT 'u1' AS profile_id, 'a@example.com' AS email")
"""


pytestmark = pytest.mark.usefixtures("restore_logging")  # cli.main configures logging


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


# -- #16 A: check runs the data sources' SQL ---------------------------------------------

SOURCED_APP = '''\
from segflowd import Segflow
from sqlalchemy import select
from segflowd.schema import users

app = Segflow(templates="templates")
app.data_source("members", source="crm", discovery={discovery!r}, audience={audience!r},
                preload={preload!r})
app.audience_segment("gardeners", data_source="members", values={{"community_id": 1}})

@app.campaign("hello", segments=["gardeners"])
def hello(ctx, rt):
    yield rt.send_email("welcome")
    if (yield rt.condition("crm", {condition!r}, profile_id=ctx.user_id)):
        yield rt.send_email("welcome", plan="premium")

app.template("welcome", subject="Hi {{{{ user.name }}}}", html="welcome.html")
'''


def _sourced(tmp_path: Path, store_url: str, source_url: str, *,
             template: str = "<p>{{ profile.plan_name }} {{ plan }}</p>", **sql: str) -> str:
    queries = {"discovery": DISCOVERY, "audience": AUDIENCE, "preload": PRELOAD,
               "condition": PREMIUM, **sql}
    (tmp_path / "templates").mkdir(exist_ok=True)
    (tmp_path / "templates" / "welcome.html").write_text(template)
    return _config(tmp_path, store_url, f'[sources.crm]\nurl = "{source_url}"\n',
                   SOURCED_APP.format(**queries))


def test_check_passes_correct_data_source_sql_and_profile_columns_on_postgres(
        tmp_path: Path, sqlite_url: str, postgres_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """#16 defect 1 (``profile``) and 5: the queries run, with no row fetched."""
    seed_postgres(postgres_url)
    config = _sourced(tmp_path, sqlite_url, postgres_url)
    code = main(["check", "--config", config])
    out = capsys.readouterr().out
    assert out.strip().endswith("check: ok"), out
    assert code == 0


@pytest.mark.parametrize(("kind", "bad"), [
    ("discovery", DISCOVERY.replace("community_name", "community_nam")),
    ("audience", AUDIENCE.replace("u.first_name", "u.frist_name")),
    ("preload", PRELOAD.replace("total_purchases", "total_purchase")),
    ("condition", PREMIUM.replace("subscription_plan", "subscription_pla")),
])
def test_check_runs_each_data_source_query_on_postgres_and_names_what_failed(
        tmp_path: Path, sqlite_url: str, postgres_url: str, kind: str, bad: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """#16 defect 5: a column typo is a problem naming source, query kind, database."""
    seed_postgres(postgres_url)
    config = _sourced(tmp_path, sqlite_url, postgres_url, **{kind: bad})
    assert main(["check", "--config", config]) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1, out
    [problem] = problems
    assert "data source 'crm'" in problem
    assert kind in problem
    assert "does not exist" in problem  # PostgreSQL's own message
    assert f"{tmp_path / 'flows.py'}:" in problem


def test_check_reports_an_undefined_profile_column_once_the_preload_is_known(
        tmp_path: Path, sqlite_url: str, postgres_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    seed_postgres(postgres_url)
    config = _sourced(tmp_path, sqlite_url, postgres_url,
                      template="<p>{{ profile.plan_nme }}</p>")
    assert main(["check", "--config", config]) == 1
    out = capsys.readouterr().out
    assert "plan_nme" in out
    assert "welcome.html:1" in out


def test_check_runs_data_source_sql_on_mariadb_read_only(
        tmp_path: Path, sqlite_url: str, mariadb_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    engine = sa.create_engine(sa.engine.make_url(mariadb_url).set(drivername="mysql+pymysql"),
                              poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id varchar(64) PRIMARY KEY, "
                             "email varchar(200), plan varchar(20))")
        conn.exec_driver_sql("INSERT INTO customers VALUES ('c1', 'c1@example.com', 'pro')")
    url = mariadb_url.replace("mysql+aiomysql://", "mysql://")
    app = APP.replace('audience="SELECT', 'discovery="SELECT DISTINCT plan FROM customers",'
                      ' preload="SELECT plan AS plan_name FROM customers WHERE id = '
                      "'<%= profile_id %>'\",\n                audience=\"SELECT")
    good = app.replace("'u1' AS profile_id, 'a@example.com' AS email",
                       "id AS profile_id, email FROM customers")
    config = _config(tmp_path, sqlite_url, f'[sources.crm]\nurl = "{url}"\n', good)
    code = main(["check", "--config", config])
    out = capsys.readouterr().out
    assert (code, out.strip().splitlines()[-1]) == (0, "check: ok"), out
    config = _config(tmp_path, sqlite_url, f'[sources.crm]\nurl = "{url}"\n',
                     good.replace("id AS profile_id, email", "id AS profile_id, emial"))
    assert main(["check", "--config", config]) == 1
    out = capsys.readouterr().out
    [problem] = [line for line in out.splitlines() if line.startswith("problem:")]
    assert "audience query of data source 'members'" in problem
    assert "data source 'crm'" in problem
    assert "emial" in problem  # MariaDB's own message: Unknown column 'emial'
    with engine.connect() as conn:  # nothing was read out or written
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM customers").scalar() == 1
    engine.dispose()


def test_an_unreachable_source_is_a_warning_naming_what_was_skipped_and_strict_fails(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _config(tmp_path, sqlite_url, f'[sources.crm]\nurl = '
                     f'"postgresql://u:pw@127.0.0.1:{port}/x"\nconnect_timeout = 1\n')
    assert main(["check", "--config", config]) == 0
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines()
                   if line.startswith("warning:") and "source 'crm'" in line)
    assert "audience query of data source 'members'" in warning
    assert "unreachable" in warning
    assert ":pw@" not in out
    assert main(["check", "--strict", "--config", config]) == 1
    out = capsys.readouterr().out
    assert "problem: source 'crm'" in out
    assert "check: 1 problem" in out
