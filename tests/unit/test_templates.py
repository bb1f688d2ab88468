"""Rendering: autoescaping, the component library, CSS inlining, the text part, tracking."""

from __future__ import annotations

import textwrap
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pytest

from segflowd.app import Segflow
from segflowd.delivery.templates import Renderer, add_tracking
from segflowd.errors import TemplateError


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
    assert 'href="mailto:x@y.z"' in out  # re-serialized from lxml's parse: quotes are '"'
    assert 'href="#top"' in out
    assert 'href="https://h/u/tok"' in out
    assert out.endswith('<img src="https://t/o/1" width="1" height="1" alt="" '
                        'style="display:block;border:0;width:1px;height:1px"></body></html>')


_VALUE = st.builds(
    lambda q, inner: q + inner.replace(q, "") + q if q else inner.replace('"', ""),
    st.sampled_from(['"', "'", ""]),
    st.lists(st.sampled_from(["a", "<", ">", '"', "'", " "]), max_size=4).map("".join))
_ATTR = st.builds(lambda ws, name, eq, value: ws + name + (eq + value if eq else ""),
                  st.sampled_from([" ", "  ", "\n"]), st.sampled_from(["x", "y"]),
                  st.sampled_from(["", "=", " = ", "= "]), _VALUE)
_TAG = st.builds(lambda name, attrs, end: "<" + name + "".join(attrs) + end,
                 st.sampled_from(["a", "p"]), st.lists(_ATTR, max_size=3),
                 st.sampled_from([">", "/>", " >"]))


@hypothesis.settings(max_examples=1000, deadline=None)
@hypothesis.given(st.lists(st.one_of(_TAG, st.sampled_from(["t", " ", "<", ">", '"', "'"])),
                           min_size=1, max_size=4).map("".join))
def test_the_angle_prefilter_never_skips_a_tag_the_rewrite_would_change(html: str) -> None:
    """Skipping the attribute re-escaping when the cheap test finds nothing changes nothing."""
    from segflowd.delivery.templates import _MAYBE_ANGLE_VALUE, _START_TAG, _escape_angles

    if _MAYBE_ANGLE_VALUE.search(html) is None:
        assert _START_TAG.sub(_escape_angles, html) == html


def test_angles_in_attribute_values_are_escaped_after_inlining(tmp_path: Path) -> None:
    r = make(tmp_path, {"t.html": '<p title="{{ user.bio }}" class="x">{{ user.name }}</p>'})
    html = r.render("t", {"user": {"name": "A", "bio": "<b>&"}}).html
    assert 'title="&lt;b&gt;&amp;"' in html
    assert "<b>" not in html


def test_an_events_attributes_are_seen_directly_and_never_shadow_its_own_fields(
        tmp_path: Path) -> None:
    """#16 A: ``{{ event.order_id }}`` is the attribute; name, created_at, attributes stay."""
    r = make(tmp_path, {"t.html": "{{ event.order_id }}|{{ event.name }}|"
                                  "{{ event.created_at }}|{{ event.attributes.name }}"},
             subject="{{ event.resetLink }}")
    event = {"id": 7, "name": "purchase", "created_at": "2026-03-01T09:00:00Z",
             "attributes": {"order_id": "o-1", "name": "shadow", "created_at": "x",
                            "resetLink": "https://r.example/1"}}
    out = r.render("t", {"user": {"name": "A"}, "event": event})
    assert out.subject == "https://r.example/1"
    assert "o-1|purchase|2026-03-01T09:00:00Z|shadow" in out.html
