"""Autoescaping never depends on a file's name (#25 item 6), and ``check`` reports what
turns it off.

Every HTML template, and each file it extends, includes or imports, is rendered with
escaping whatever its extension; only a ``text=`` part is plain text. The messages go
through delivery's real path (render, CSS inlining, click tracking, MIME) inside
:class:`~segflowd.testing.Simulation`, with a user whose name is hostile HTML.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from segflowd.app import Segflow
from segflowd.cli.checktemplates import template_problems
from segflowd.delivery.tokens import Signer
from segflowd.simulation import LINK_SECRET
from segflowd.testing import SentMessage, Simulation

HOSTILE = '<a href="https://evil.example/">x</a><script>alert(1)</script>'
GENUINE = "https://example.com/real"
# "" is a file with no extension at all; ".txt" here is an *HTML* part, named oddly.
EXTENSIONS = [".html", ".htm", ".xml", ".j2", ".jinja", ".jinja2", ".html.jinja",
              ".html.j2", ".mjml", ".tpl", ".txt", ""]

BASE = """\
<!DOCTYPE html><html><head><title>{{ user.name }}</title></head>
<body>{% block content %}{% endblock %}<p class="base">{{ user.name }}</p></body></html>
"""
MAIN = """\
{{% extends "base{ext}" %}}
{{% import "macros{ext}" as m %}}
{{% block content %}}
<p title="{{{{ user.name }}}}">Hello {{{{ user.name }}}}</p>
{{% include "part{ext}" %}}
{{{{ m.card(user.name) }}}}
<a href="{GENUINE}" title="{{{{ user.name }}}}">Real</a>
{{% endblock %}}
"""
PART = '<div class="part" data-who="{{ user.name }}">{{ user.name }}</div>\n'
MACROS = '{% macro card(who) %}<div class="card">{{ who }}</div>{% endmacro %}\n'
TEXT = "Hello {{ user.name }}\n{% include 'text-include.html' %}"


def _name(ext: str) -> str:
    return "t" + re.sub(r"[^a-z0-9]", "-", ext) if ext else "t-none"


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, SentMessage]]:
    folder = tmp_path_factory.mktemp("escaping")
    templates = folder / "templates"
    templates.mkdir()
    app = Segflow(templates=templates)
    for ext in EXTENSIONS:
        (templates / f"base{ext}").write_text(BASE)
        (templates / f"main{ext}").write_text(MAIN.format(ext=ext, GENUINE=GENUINE))
        (templates / f"part{ext}").write_text(PART)
        (templates / f"macros{ext}").write_text(MACROS)
        app.template(_name(ext), subject="Hi {{ user.name }}", html=f"main{ext}", track=True)
        app.transaction(_name(ext), event=f"go-{_name(ext)}", template=_name(ext))
    # A text= part named .html (and what it includes) is plain text all the same.
    (templates / "text.html").write_text(TEXT)
    (templates / "text-include.html").write_text("Bye {{ user.name }}\n")
    app.template("with-text", subject="Hi", html="main.jinja", text="text.html")
    app.transaction("with-text", event="go-with-text", template="with-text")
    with Simulation(app, start="2026-03-01T09:00:00Z") as sim:
        sim.user("eve", email="eve@example.com", name=HOSTILE)
        for ext in EXTENSIONS:
            sim.event("eve", f"go-{_name(ext)}")
        sim.event("eve", "go-with-text")
        yield {m.template: m for m in sim.sent("eve")}


def _html_part(message: SentMessage) -> str:
    parsed = email.message_from_bytes(message.mime, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    part = parsed.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())  # type: ignore[attr-defined]  # EmailMessage part


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_user_data_is_escaped_in_every_html_template_whatever_its_extension(
        sent: dict[str, SentMessage], ext: str) -> None:
    message = sent[_name(ext)]
    for html in (message.html, _html_part(message)):
        root = etree.HTML(html)
        assert root is not None
        # No element came from the data: no script, and the only link is the template's.
        assert root.findall(".//script") == []
        links = [a.get("href") or "" for a in root.iter("a")]
        assert len(links) == 1, links
        assert "evil.example" not in links[0]
        assert Signer(LINK_SECRET).verify("c", links[0].rsplit("/t/c/", 1)[1])["l"] == GENUINE
        assert "<script" not in html.lower()
        assert '<a href="https://evil.example/"' not in html
        # The name is there, as text, in the page, the base, the include and the macro.
        texts = ["".join(p.itertext()) for p in root.iter("p", "div", "title")]
        assert sum(HOSTILE in t for t in texts) == 5, texts
        assert root.xpath("//div[@class='part']/@data-who") == [HOSTILE]


def test_only_a_text_part_is_rendered_unescaped_whatever_its_name(
        sent: dict[str, SentMessage]) -> None:
    message = sent["with-text"]
    assert message.text == f"Hello {HOSTILE}\nBye {HOSTILE}"
    assert "<script" not in message.html.lower()


def _app(tmp_path: Path, files: dict[str, str], html: str = "main.jinja",
         text: str | None = None) -> Segflow:
    for name, body in files.items():
        (tmp_path / name).write_text(textwrap.dedent(body))
    app = Segflow(templates=tmp_path)
    app.template("t", subject="Hi", html=html, text=text)
    return app


def test_check_reports_an_autoescape_block_that_turns_escaping_off_with_file_and_line(
        tmp_path: Path) -> None:
    app = _app(tmp_path, {
        "main.jinja": """\
            <p>{{ user.name }}</p>
            {% include "part.mjml" %}
            {% autoescape true %}{{ user.name }}{% endautoescape %}
            """,
        "part.mjml": """\
            <div>
            {% autoescape false %}{{ user.name }}{% endautoescape %}
            </div>
            """})
    problems = template_problems(app, [], None)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{tmp_path / 'part.mjml'}:2: template 't': ")
    assert "{% autoescape %} turns HTML escaping off" in problems[0]


def test_check_reports_safe_on_data_but_not_on_literals_or_its_own_values(
        tmp_path: Path) -> None:
    app = _app(tmp_path, {"main.jinja": """\
        <p>{{ "<b>ok</b>"|safe }} {{ unsubscribe_url|safe }}</p>
        <p>{{ user.bio|safe }}</p>
        {% for item in items %}{% filter safe %}{{ item.title }}{% endfilter %}{% endfor %}
        """})
    problems = template_problems(app, [], None)
    assert [p.split(": ", 1)[0] for p in problems] == [
        f"{tmp_path / 'main.jinja'}:2", f"{tmp_path / 'main.jinja'}:3"], problems
    assert "|safe on user puts data into the message as HTML" in problems[0]
    assert "{% filter safe %} over item" in problems[1]


def test_check_does_not_look_for_escaping_in_a_text_part(tmp_path: Path) -> None:
    app = _app(tmp_path, {"main.html": "<p>{{ user.name }}</p>",
                          "plain.html": "{% autoescape false %}{{ user.name }}"
                                        "{% endautoescape %} {{ user.name|safe }}"},
               html="main.html", text="plain.html")
    assert template_problems(app, [], None) == []
