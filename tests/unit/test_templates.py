"""Rendering: autoescaping, the component library, CSS inlining, the text part, tracking."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from segflowd.app import Segflow
from segflowd.errors import TemplateError
from segflowd.templates import Renderer, add_tracking


def make(tmp_path: Path, files: dict[str, str], subject: str = "Hi {{ user.name }}") -> Renderer:
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    app = Segflow(templates=tmp_path)
    app.template("t", subject=subject, html="t.html")
    return Renderer(app)


def test_html_is_autoescaped_even_in_attributes(tmp_path: Path) -> None:
    r = make(tmp_path, {"t.html": '<p title="{{ user.bio }}">{{ user.bio }}</p>'})
    out = r.render("t", {"user": {"name": "A", "bio": '"><script>alert(1)</script>'}})
    assert "<script>" not in out.html
    assert "&lt;script&gt;" in out.html
    assert 'title="&quot;&gt;&lt;script&gt;' in out.html


def test_subject_is_a_template_not_escaped_and_one_line(tmp_path: Path) -> None:
    r = make(tmp_path, {"t.html": "<p>x</p>"}, subject="Hi {{ user.name }} & co")
    assert r.render("t", {"user": {"name": "Tom\r\nBcc: x@y"}}).subject == \
        "Hi Tom Bcc: x@y & co"


def test_undefined_variables_raise_a_template_error(tmp_path: Path) -> None:
    r = make(tmp_path, {"t.html": "<p>{{ usr.name }}</p>"})
    with pytest.raises(TemplateError, match="'usr' is undefined"):
        r.render("t", {"user": {"name": "A"}})


def test_css_is_inlined_and_media_rules_kept(tmp_path: Path) -> None:
    r = make(tmp_path, {"t.html": """\
        <html><head><style>.big { font-size: 30px }
        @media (max-width: 600px) { .big { font-size: 20px } }</style>
        <link rel="stylesheet" href="https://cdn.example.com/x.css"></head>
        <body><p class="big">Hello</p></body></html>"""})
    html = r.render("t", {"user": {"name": "A"}}).html
    assert 'style="font-size: 30px;"' in html
    assert "@media (max-width: 600px)" in html


def test_components_layout_and_utilities(tmp_path: Path) -> None:
    r = make(tmp_path, {"t.html": """\
        {% extends "segflow/layout.html" %}
        {% import "segflow/components.html" as ui %}
        {% block preview %}Preview for {{ user.name }}{% endblock %}
        {% block content %}
        {{ ui.heading("Hello " ~ user.name, level=2) }}
        {% call ui.text(class_="text-center") %}Body <b>text</b>{% endcall %}
        {{ ui.button("https://example.com/go", "Go") }}
        {{ ui.image("https://example.com/i.png", "Logo", width=120) }}
        {{ ui.divider() }}
        {% endblock %}"""})
    out = r.render("t", {"user": {"name": "<Ann>"}, "unsubscribe_url": "https://h/u/tok"})
    html = out.html
    assert "Hello &lt;Ann&gt;</h2>" in html
    assert "font-weight: 700" in html  # font-bold inlined from the utility stylesheet
    assert "text-align: center" in html
    assert 'href="https://example.com/go"' in html
    assert 'alt="Logo"' in html
    assert 'width="120"' in html
    assert 'href="https://h/u/tok"' in html  # the footer's unsubscribe link
    assert "Preview for &lt;Ann&gt;" in html
    assert "@media (max-width: 620px)" in html


def test_text_part_is_generated_with_links(tmp_path: Path) -> None:
    r = make(tmp_path, {"t.html": """\
        <html><body><h1>Title</h1><p>First &amp; second</p>
        <a href="https://example.com/x">Open</a>
        <div style="display:none">hidden preview</div></body></html>"""})
    text = r.render("t", {"user": {"name": "A"}}).text
    assert "Title" in text
    assert "First & second" in text
    assert "https://example.com/x" in text
    assert "<" not in text.replace("<", "", 0) or "<h1>" not in text
    assert "  \n" not in text  # no trailing blanks


def test_add_tracking_rewrites_web_links_only_and_adds_the_pixel() -> None:
    html = ('<html><body><a href="https://a.example/x?y=1&amp;z=2">a</a>'
            "<a href='mailto:x@y.z'>m</a><a href=\"#top\">t</a>"
            '<a data-segflow-notrack="1" href="https://h/u/tok">u</a></body></html>')
    out = add_tracking(html, lambda url: f"https://t/c?{url}", "https://t/o/1")
    assert 'href="https://t/c?https://a.example/x?y=1&amp;z=2"' in out
    assert "href='mailto:x@y.z'" in out
    assert 'href="#top"' in out
    assert 'href="https://h/u/tok"' in out
    assert out.endswith('<img src="https://t/o/1" width="1" height="1" alt="" '
                        'style="display:block;border:0;width:1px;height:1px"></body></html>')
