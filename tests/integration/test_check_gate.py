"""``segflowd check`` as a deploy gate (#16 A): templates checked with their documented
context, template names found in the flows, segment parameters, probing an empty store on
its own dialect, and ``--fail-on-divergence``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from test_check import make as make_config

from segflowd.cli.commands import main
from segflowd.flows.runtime import args_hash
from segflowd.schema import flow_instances, flow_journal
from segflowd.store import Store

APP = """\
from segflowd import Segflow
from segflowd.schema import users
from sqlalchemy import select

app = Segflow(templates="templates")

@app.segment("everyone")
def everyone():
    return select(users.c.id)

@app.campaign("hello", segments=["everyone"])
def hello(ctx, rt):
    yield rt.send_email("welcome", attempt=1)
    yield rt.wait(days=1)

app.template("welcome", subject="Hi {{ user.name }}", html="welcome.html")
"""


pytestmark = pytest.mark.usefixtures("restore_logging")  # cli.main configures logging


def make(tmp_path: Path, store_url: str, app: str = APP,
         template: str = "<p>{{ user.name }}</p>") -> Path:
    """test_check's layout, with this module's app by default."""
    return make_config(tmp_path, store_url, app, template)


def check(config: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str]:
    code = main(["check", "--config", str(config), *flags])
    return code, capsys.readouterr().out


# -- 1. documented template context --------------------------------------------------


def test_check_passes_templates_using_message_send_email_keywords_data_and_event(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """#16 defect 1: documented context is not "undefined"."""
    config = make(tmp_path, sqlite_url, template=(
        "<p>{{ message.template }} {{ message.kind }} try {{ attempt }} "
        "{{ data.attempt }} <a href='{{ unsubscribe_url }}'>u</a> {{ event.order_id }}</p>"))
    code, out = check(config, capsys)
    assert out.strip().endswith("check: ok"), out
    assert code == 0


def test_check_passes_a_template_whose_sends_pass_keywords_not_known_statically(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    app = APP.replace('rt.send_email("welcome", attempt=1)',
                      'rt.send_email("welcome", **dict(ctx.user))')
    config = make(tmp_path, sqlite_url, app, template="<p>{{ plan }}</p>")
    code, out = check(config, capsys)
    assert (code, out.strip().splitlines()[-1]) == (0, "check: ok"), out


def test_check_still_reports_a_truly_undefined_variable_with_its_file_and_line(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = make(tmp_path, sqlite_url,
                  template="<p>{{ user.name }}</p>\n<p>{{ attempt }}</p>\n<p>{{ atempt }}</p>")
    code, out = check(config, capsys)
    assert code == 1
    problem = next(line for line in out.splitlines() if "atempt" in line)
    assert "'atempt' is undefined" in problem
    assert "welcome.html:3" in problem
    assert "check: 1 problem" in out


def test_check_reports_a_keyword_only_another_template_is_sent_with(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Keywords are per template: ``attempt`` goes with 'welcome' only."""
    app = APP.replace("    yield rt.wait(days=1)\n",
                      '    yield rt.wait(days=1)\n    yield rt.send_email("other")\n') + \
        'app.template("other", subject="{{ attempt }}", html="welcome.html")\n'
    config = make(tmp_path, sqlite_url, app, template="<p>x</p>")
    code, out = check(config, capsys)
    assert code == 1
    assert "template 'other'" in out
    assert "'attempt' is undefined" in out


# -- 2. template names in campaigns ---------------------------------------------------


def test_check_reports_a_misspelled_template_name_with_the_campaigns_file_and_line(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """#16 defect 2."""
    app = APP.replace('rt.send_email("welcome", attempt=1)', 'rt.send_email("welcom")')
    config = make(tmp_path, sqlite_url, app)
    code, out = check(config, capsys)
    assert code == 1
    problem = next(line for line in out.splitlines() if "welcom'" in line)
    assert problem.startswith(f"problem: {tmp_path / 'flows.py'}:13: campaign 'hello'")
    assert "unknown template 'welcom'" in problem
    assert "check: 1 problem" in out


# -- 3. segment parameters -------------------------------------------------------------

PARAMS_APP = APP + """
from segflowd import ago
app.segment("inactive", refresh="15m",
            sql="SELECT user_id AS id FROM events WHERE name = 'login' "
                "GROUP BY user_id HAVING MAX(created_at) < :cutoff",
            params={"cutof": ago(days=30)})
"""


def test_check_reports_segment_params_that_do_not_match_the_sql_binds(
        tmp_path: Path, store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """#16 defect 3: a typo in params= is a problem naming file and line, no traceback."""
    config = make(tmp_path, store_url, PARAMS_APP)
    code, out = check(config, capsys)
    assert code == 1
    problems = [line for line in out.splitlines() if "segment 'inactive'" in line]
    assert len(problems) == 1, out
    assert problems[0].startswith(f"problem: {tmp_path / 'flows.py'}:19: segment 'inactive'")
    assert ":cutoff" in problems[0]
    assert "'cutof'" in problems[0]
    assert "Traceback" not in out


# -- 4. an empty MariaDB store is probed on MariaDB ----------------------------------


def test_check_probes_an_empty_mariadb_store_on_mariadb_and_leaves_it_empty(
        tmp_path: Path, mariadb_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """#16 defect 4: a MySQL-only segment passes against an empty store."""
    app = APP + (
        'app.segment("lapsed", sql="SELECT user_id AS id FROM events WHERE name = \'login\' '
        'GROUP BY user_id HAVING MAX(created_at) < NOW() - INTERVAL 30 DAY")\n')
    config = make(tmp_path, mariadb_url, app)
    code, out = check(config, capsys)
    assert "empty; it will be created at start" in out
    assert out.strip().endswith("check: ok"), out
    assert code == 0
    broken = make(tmp_path, mariadb_url, app.replace("FROM events WHERE", "FROM evnts WHERE"))
    code, out = check(broken, capsys)
    assert code == 1
    assert "segment 'lapsed' fails" in out
    assert "evnts" in out
    engine = sa.create_engine(sa.engine.make_url(mariadb_url).set(drivername="mysql+pymysql"),
                              poolclass=sa.pool.NullPool)
    try:
        assert sa.inspect(engine).get_table_names() == []  # check changed nothing
    finally:
        engine.dispose()


# -- --fail-on-divergence ----------------------------------------------------------------


async def _in_flight(url: str, version: str, journal_name: str) -> None:
    """One instance of 'hello' on ``version``, its journal: send_email(journal_name)."""
    store = Store.open(url)
    await store.migrate()
    now = dt.datetime(2026, 3, 1, 9, 0, 0)
    try:
        async with store.begin() as conn:
            iid = (await conn.execute(sa.insert(flow_instances).values(
                campaign="hello", user_id="ann", version=version, status="waiting", live=1,
                seq=1, wake_at=now + dt.timedelta(days=1), created_at=now,
                updated_at=now))).inserted_primary_key[0]
            await conn.execute(sa.insert(flow_journal).values(
                instance_id=iid, seq=0, kind="send_email", name=journal_name,
                args_hash=args_hash("send_email", journal_name, {"attempt": 1}),
                result={"value": None}, created_at=now))
    finally:
        await store.close()


def test_fail_on_divergence_exits_1_naming_the_campaign_and_first_mismatch(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = make(tmp_path, sqlite_url)
    anyio.run(_in_flight, sqlite_url, "old-version", "goodbye")
    code, out = check(config, capsys)
    assert code == 0  # without the flag the preview only informs
    assert "1 would diverge" in out
    code, out = check(config, capsys, "--fail-on-divergence")
    assert code == 1
    problem = next(line for line in out.splitlines()
                   if line.startswith("problem:") and "diverge" in line)
    assert "campaign 'hello'" in problem
    assert "goodbye" in problem
    assert "check: 1 problem" in out


def test_fail_on_divergence_passes_when_in_flight_instances_move_cleanly(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = make(tmp_path, sqlite_url)
    anyio.run(_in_flight, sqlite_url, "old-version", "welcome")
    code, out = check(config, capsys, "--fail-on-divergence")
    assert "1 would move, 0 would diverge" in out
    assert code == 0, out
