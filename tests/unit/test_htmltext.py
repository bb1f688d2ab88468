"""The text part made from HTML: readable blocks, lists, links, tables; nothing hidden."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from segflowd.delivery.htmltext import html_to_text
from segflowd.delivery.templates import Renderer, sample_user
from segflowd.loader import load_app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "saas"


def test_paragraphs_and_headings_are_blocks_and_br_breaks_a_line() -> None:
    html = "<h1>Your   receipt</h1><p>Hi Ann,<br>thanks &amp; welcome.</p><p>Bye</p>"
    assert html_to_text(html) == "Your receipt\n\nHi Ann,\nthanks & welcome.\n\nBye\n"


def test_head_style_script_comments_and_hidden_elements_are_not_text() -> None:
    html = ("<html><head><title>T</title><style>p{color:red}</style></head><body>"
            "<script>var x = '<p>no</p>';</script><!-- note -->"
            '<div class="sf-preview" style="color:red; display : none">preview</div>'
            "<p hidden>hidden</p><p>shown</p></body></html>")
    assert html_to_text(html) == "shown\n"


def test_lists_have_bullets_numbers_and_nested_indentation() -> None:
    html = ("<ul><li>First</li><li>Second<ul><li>Nested</li></ul></li><li>Third</li></ul>"
            '<ol start="3"><li>Three</li><li>Four</li></ol>')
    assert html_to_text(html) == (
        "* First\n* Second\n  * Nested\n* Third\n\n3. Three\n4. Four\n")


def test_links_show_their_url_once_and_skip_non_web_targets() -> None:
    html = ('<p><a href="https://e.com/x">Open</a> <a href="https://e.com/y">https://e.com/y</a> '
            '<a href="mailto:help@e.com">help@e.com</a> <a href="#top">top</a> '
            '<a href="https://e.com/logo"><img src="l.png" alt="Logo"></a></p>')
    assert html_to_text(html) == (
        "Open (https://e.com/x) https://e.com/y help@e.com top Logo (https://e.com/logo)\n")


def test_tables_are_written_row_by_row() -> None:
    html = ("<table><tr><th>Item</th><th>Price</th></tr>"
            "<tr><td>Widget &lt;Pro&gt;</td><td>&euro;10</td></tr></table>")
    assert html_to_text(html) == "Item  Price\nWidget <Pro>  €10\n"


def test_pre_keeps_its_lines_and_blockquote_is_marked() -> None:
    html = "<pre>  a  b\n    c</pre><blockquote><p>quoted</p></blockquote>"
    assert html_to_text(html) == "  a  b\n    c\n\n> quoted\n"


def test_entities_and_invisible_preview_characters() -> None:
    html = "<p>caf&eacute; &#x1F600;&nbsp;&nbsp;x&zwnj;&#8203;y</p>"
    assert html_to_text(html) == "café 😀 xy\n"


@pytest.mark.parametrize("html", ["", "   ", "<!-- only a comment -->"])
def test_empty_documents_give_one_newline(html: str) -> None:
    assert html_to_text(html) == "\n"


def test_a_string_with_an_xml_declaration_still_converts() -> None:
    html = '<?xml version="1.0" encoding="utf-8"?><html><body><p>Grüße</p></body></html>'
    assert html_to_text(html) == "Grüße\n"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


@pytest.mark.parametrize("template", ["welcome", "complete-profile-reminder",
                                      "feature-highlights", "we-miss-you"])
def test_example_emails_have_the_same_words_as_inscriptis_gives(template: str) -> None:
    """Sanity against a maintained layout engine: the same words in the same order."""
    inscriptis = pytest.importorskip("inscriptis")
    config = pytest.importorskip("inscriptis.model.config")
    app = load_app(str(EXAMPLES / "flows.py"), EXAMPLES)
    renderer = Renderer(app)
    html = renderer.env.get_template(app.templates[template].html).render(
        {"user": sample_user(), "unsubscribe_url": "https://mail.example.com/u/tok"})
    ours = html_to_text(html)
    theirs = inscriptis.get_text(html, config.ParserConfig(display_links=True))
    assert _words(ours) == _words(theirs.replace("](", " ("))
    assert "<" not in ours
    assert "  \n" not in ours


def test_text_before_an_unclosed_head_or_a_commented_body_tag_is_kept() -> None:
    assert html_to_text("Intro <p>x</p><body><p>y</p></body>") == "Intro\n\nx\n\ny\n"
    assert html_to_text("<head><!-- <body> --></head><body><p>y</p></body>") == "y\n"
    assert html_to_text("<head><style>a{}</style></head><bodyx>z</bodyx>") == "z\n"
