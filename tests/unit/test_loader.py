"""Loading the user's app: file and module:attr forms, and clear errors with file and line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from segflowd import Segflow
from segflowd.errors import AppError
from segflowd.loader import load_app

GOOD = """\
from sqlalchemy import select
from segflowd import Segflow
from segflowd.schema import users

app = Segflow(templates="templates")

@app.segment("everyone")
def everyone():
    return select(users.c.id)

@app.campaign("hello", segments=["everyone"])
def hello(ctx, rt):
    yield rt.send_email("welcome")

app.template("welcome", subject="Hi {{ user.name }}", html="welcome.html")
app.transaction("reset", event="reset_requested", template="welcome")
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "welcome.html").write_text("<p>Hi {{ user.name }}</p>")
    saved = list(sys.path)
    yield tmp_path
    sys.path[:] = saved


def write_app(folder: Path, source: str, name: str = "flows.py") -> Path:
    path = folder / name
    path.write_text(source, encoding="utf-8")
    return path


def load_error(spec: str, base: Path) -> str:
    with pytest.raises(AppError) as info:
        load_app(spec, base)
    return str(info.value)


def test_file_form_loads_with_explicit_and_default_attr(app_dir: Path) -> None:
    write_app(app_dir, GOOD)
    for spec in ("flows.py:app", "flows.py", str(app_dir / "flows.py")):
        app = load_app(spec, app_dir)
        assert isinstance(app, Segflow)
        assert list(app.segments) == ["everyone"]
        assert list(app.campaigns) == ["hello"]
        assert app.transactions["reset"].template == "welcome"


def test_templates_folder_is_relative_to_the_app_file(app_dir: Path) -> None:
    write_app(app_dir, GOOD)
    app = load_app("flows.py:app", app_dir)
    assert app.templates_dir == app_dir / "templates"


def test_module_form_loads_from_the_config_folder(app_dir: Path) -> None:
    pkg = app_dir / "myco_marketing"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "templates").mkdir()
    (pkg / "templates" / "welcome.html").write_text("hi")
    write_app(pkg, GOOD, "flows.py")
    app = load_app("myco_marketing.flows:app", app_dir)
    assert list(app.templates) == ["welcome"]


def test_missing_app_file_is_named(app_dir: Path) -> None:
    msg = load_error("nowhere.py:app", app_dir)
    assert f"app file {app_dir / 'nowhere.py'} not found" in msg


def test_missing_module_is_named(app_dir: Path) -> None:
    msg = load_error("no_such_pkg.flows:app", app_dir)
    assert "app module 'no_such_pkg.flows' not found" in msg


def test_missing_attribute_is_named(app_dir: Path) -> None:
    write_app(app_dir, GOOD)
    msg = load_error("flows.py:application", app_dir)
    assert "has no attribute 'application'" in msg


def test_attribute_that_is_not_a_segflow_is_refused(app_dir: Path) -> None:
    write_app(app_dir, "app = 42\n")
    msg = load_error("flows.py:app", app_dir)
    assert "is a int, not a segflowd.Segflow" in msg


def test_syntax_error_names_file_and_line(app_dir: Path) -> None:
    path = write_app(app_dir, "from segflowd import Segflow\napp = Segflow()\nif True\n")
    msg = load_error("flows.py:app", app_dir)
    assert f"{path}:3: syntax error" in msg


def test_exception_while_importing_names_the_users_line(app_dir: Path) -> None:
    path = write_app(app_dir, "from segflowd import Segflow\n\napp = Segflow()\n1 / 0\n")
    msg = load_error("flows.py", app_dir)
    assert f"{path}:4: ZeroDivisionError" in msg


def test_duplicate_segment_names_both_places(app_dir: Path) -> None:
    path = write_app(app_dir, GOOD + '\napp.segment("everyone", sql="SELECT id FROM users")\n')
    msg = load_error("flows.py", app_dir)
    assert f"{path}:18: segment 'everyone' is already defined at {path}:7" in msg


@pytest.mark.parametrize(("extra", "what"), [
    ('\n@app.campaign("hello", segments=["everyone"])\ndef again(ctx, rt):\n    yield 1\n',
     "campaign 'hello' is already defined"),
    ('\napp.template("welcome", subject="x", html="welcome.html")\n',
     "template 'welcome' is already defined"),
    ('\napp.transaction("reset", event="e", template="welcome")\n',
     "transaction 'reset' is already defined"),
])
def test_duplicate_names_of_every_kind_are_errors(app_dir: Path, extra: str, what: str) -> None:
    path = write_app(app_dir, GOOD + extra)
    msg = load_error("flows.py", app_dir)
    assert f"{path}:" in msg
    assert what in msg


def test_campaign_naming_an_unknown_segment(app_dir: Path) -> None:
    path = write_app(app_dir, GOOD.replace('segments=["everyone"]',
                                           'segments=["everyone"], exclude=["vips"]'))
    msg = load_error("flows.py", app_dir)
    assert f"{path}:11: campaign 'hello' names unknown segment 'vips'" in msg


def test_transaction_naming_an_unknown_template(app_dir: Path) -> None:
    path = write_app(app_dir, GOOD.replace('template="welcome")', 'template="reset-mail")'))
    msg = load_error("flows.py", app_dir)
    assert f"{path}:16: transaction 'reset' names unknown template 'reset-mail'" in msg


def test_template_file_missing_is_reported(app_dir: Path) -> None:
    write_app(app_dir, GOOD.replace('html="welcome.html"', 'html="welcom.html"'))
    msg = load_error("flows.py", app_dir)
    assert "template 'welcome': file 'welcom.html' not found" in msg


def test_all_cross_reference_problems_are_listed_together(app_dir: Path) -> None:
    write_app(app_dir, GOOD.replace('segments=["everyone"]', 'segments=["nobody"]')
              .replace('template="welcome")', 'template="gone")'))
    msg = load_error("flows.py", app_dir)
    assert "unknown segment 'nobody'" in msg
    assert "unknown template 'gone'" in msg
    app = load_app("flows.py", app_dir, validate=False)
    assert len(app.problems()) == 2


def test_campaign_must_be_a_generator_function(app_dir: Path) -> None:
    path = write_app(app_dir, GOOD.replace("    yield rt.send_email", "    return rt.send_email"))
    msg = load_error("flows.py", app_dir)
    assert f"{path}:" in msg
    assert "campaign 'hello'" in msg


def test_example_app_loads_and_validates() -> None:
    root = Path(__file__).resolve().parents[2]
    app = load_app("examples/saas/flows.py:app", root)
    assert {"new-users", "big-spenders", "inactive-users"} <= set(app.segments)
    assert "onboarding" in app.campaigns
    assert "welcome" in app.templates
    assert app.transactions["password-reset"].template == "password-reset"
